"""Benchmark of the feature caches on a recipe's model: quality against full precision and measured speed-up.

    python tools/bench_cache.py --n 500 --json runs/bench_cache.json [--plot docs/bench_cache.png]

For every target NFC (25, 17, 14, 10, 8) it runs FORA, TaylorSeer (m=2), RFE-only (fixed, evenly spread full
steps), RCS-only (TaylorSeer forecasts, tau tuned) and RFC (m=2, tau tuned). Every method samples the same n images
from the same noise as the full-precision (FP) reference. Fixed schedules place exactly NFC full steps; RCS methods
get tau by bisection on a separate calibration batch (seed ``--tune-seed``) and then run live, so their NFC is the
one measured on the evaluation batch. Latency: every configuration, FP included, is timed in interleaved rounds in
this same run; ``latency_ratio`` = median FP time / median time of the method.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qcache.cache import attach_cache, executed_flops, tune_tau  # noqa: E402
from qcache.cli import run_cli, write_json  # noqa: E402
from qcache.evaluate import quality_metrics  # noqa: E402
from qcache.metrics import compare_sets  # noqa: E402
from qcache.models import load_model  # noqa: E402
from qcache.recipe import CacheConfig, load_recipe, recipe_to_dict  # noqa: E402
from qcache.sampling import Sampler  # noqa: E402

METHODS = {  # name -> cache config (target_nfc filled in per row)
    "FORA": dict(policy="fora"),
    "TaylorSeer": dict(policy="taylorseer", order=2),
    "RFE-only": dict(policy="rfc", order=2, rfe=True, rcs=False),
    "RCS-only": dict(policy="rfc", order=2, rfe=False, rcs=True),
    "RFC": dict(policy="rfc", order=2, rfe=True, rcs=True),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(sampler: Sampler, n: int, cfg: CacheConfig | None, tau: float | None) -> tuple[float, float]:
    """Wall time of sampling n images with this cache attached; returns (seconds, NFC of that run)."""
    cache = None
    if cfg is not None:
        cache = attach_cache(sampler.transformer, cfg, tau=tau)
        sampler.hooks.append(cache)
    try:
        t0 = time.perf_counter()
        sampler.sample(n, progress=False)
        if sampler.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    finally:
        if cache is not None:
            sampler.hooks.remove(cache)
            cache.remove()
    return dt, (cache.stats.mean_nfc() if cache is not None else float(sampler.config.steps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "digits.yaml"))
    ap.add_argument("--n", type=int, default=500, help="samples per method (quality)")
    ap.add_argument("--json", required=True, help="write the rows here")
    ap.add_argument("--targets", default="25,17,14,10,8")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--warmup", type=int, default=2, help="first steps always full (every method)")
    ap.add_argument("--latency-samples", type=int, default=100, help="images per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    ap.add_argument("--tune-samples", type=int, default=64)
    ap.add_argument("--tune-seed", type=int, default=1)
    ap.add_argument("--source", default=None, help="override the recipe's model.source")
    ap.add_argument("--cache-compile", choices=("off", "on"), default="off",
                    help="cache.compile for every method: the cached steps' arithmetic through torch.compile "
                         "(qcache/cache/fused.py); each configuration then gets one untimed round first")
    ap.add_argument("--plot", default=None, help="PNG of FID-to-FP against NFC")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only combine the rows of earlier runs (each keeps the latency ratio of its own run)")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.json, args.plot)

    recipe = load_recipe(args.recipe)
    if args.source:
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, source=args.source))
    sampling = dataclasses.replace(recipe.sampling, batch_size=max(args.n, args.latency_samples, args.tune_samples))
    loaded = load_model(recipe.model)
    sampler = Sampler(loaded.transformer, loaded.scheduler_config, sampling)
    targets = [int(t) for t in args.targets.split(",")]
    methods = args.methods.split(",")
    compile_cache = args.cache_compile == "on"
    torch.manual_seed(0)

    log(f"FP reference: {args.n} samples, {sampling.steps} {sampling.scheduler} steps, threads={torch.get_num_threads()}")
    fp, fp_flops = executed_flops(lambda: sampler.sample(args.n, progress=False))
    fp_quality = quality_metrics(fp)
    rows = [{"method": "FP", "target_nfc": sampling.steps, "nfc": float(sampling.steps), "tau": None,
             "fid_to_fp": 0.0, "psnr": None, "ssim": 1.0, **fp_quality, "flops_per_image": fp_flops / args.n,
             "cache_bytes_per_image": 0.0}]
    configs: list[tuple[dict, CacheConfig | None, float | None]] = [(rows[0], None, None)]

    for target in targets:
        for name in methods:
            cfg = CacheConfig(**METHODS[name], warmup=args.warmup, target_nfc=target,
                              tune_samples=args.tune_samples, tune_seed=args.tune_seed,
                              compile=compile_cache)
            tau, tune = None, {}
            t0 = time.perf_counter()
            if cfg.rcs and cfg.policy == "rfc":
                res = tune_tau(sampler, cfg, target)
                tau = res.tau
                tune = {"tune_nfc": res.nfc, "tune_probes": len(res.probes), "tune_s": time.perf_counter() - t0}
            cache = attach_cache(sampler.transformer, cfg, tau=tau)
            try:
                with sampler.extra_hooks(cache):
                    out, flops = executed_flops(lambda: sampler.sample(args.n, progress=False))
            finally:
                cache.remove()
            stats = cache.stats.report()
            row = {"method": name, "target_nfc": target, "nfc": stats["nfc"], "tau": tau,
                   **compare_sets(fp.images, out.images), **quality_metrics(out),
                   "flops_per_image": flops / args.n, "cache_bytes_per_image": stats["cache_bytes_per_image"],
                   "full_steps": stats["full_steps"], **tune}
            rows.append(row)
            configs.append((row, cfg, tau))
            log(f"{name:10s} target {target:2d}: nfc {row['nfc']:.1f} fid_to_fp {row['fid_to_fp']:.4f} "
                f"psnr {row['psnr']:.2f} acc {row['class_accuracy']:.3f} fid_data {row['fid_data']:.3f}"
                + (f" tau {tau:.4g}" if tau is not None else ""))
            write_json(args.json, {"rows": rows, "complete": False})

    log(f"latency: {len(configs)} configurations x {args.repeats} rounds of {args.latency_samples} images")
    times: list[list[float]] = [[] for _ in configs]
    lat_nfc: list[float] = [0.0] * len(configs)
    timed(sampler, 2, None, None)  # warm-up
    if compile_cache:  # compiled graphs are specific to the batch shape: compile them untimed
        for _, cfg, tau in configs[1:]:
            timed(sampler, args.latency_samples, cfg, tau)
    for r in range(args.repeats):
        for i, (row, cfg, tau) in enumerate(configs):
            dt, lat_nfc[i] = timed(sampler, args.latency_samples, cfg, tau)
            times[i].append(dt)
        log(f"round {r + 1}/{args.repeats}: FP {times[0][-1]:.2f}s")
    fp_time = statistics.median(times[0])
    for (row, _, _), ts, nfc in zip(configs, times, lat_nfc):
        row["latency_s"] = statistics.median(ts)
        row["latency_runs_s"] = ts
        row["latency_nfc"] = nfc
        row["latency_ratio"] = fp_time / row["latency_s"]

    report = {
        "rows": rows, "complete": True, "n": args.n, "steps": sampling.steps, "scheduler": sampling.scheduler,
        "guidance_scale": sampling.guidance_scale, "seed": sampling.seed, "warmup": args.warmup,
        "latency_samples": args.latency_samples, "repeats": args.repeats, "tune_samples": args.tune_samples,
        "tune_seed": args.tune_seed, "cache_compile": compile_cache, "device": str(loaded.device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "command": " ".join(sys.argv),
        "recipe": recipe_to_dict(recipe),
    }
    print_table(rows)
    report["acceptance"] = acceptance(rows)
    write_json(args.json, report)
    if args.plot:
        plot(rows, args.plot)


def merge(paths: list[str], out: str, plot_path: str | None) -> None:
    """Combine the reports of several runs (e.g. one per group of targets) into one table and plot."""
    import json

    reports = [json.loads(Path(p).read_text()) for p in paths]
    rows = [reports[0]["rows"][0]] + [r for rep in reports for r in rep["rows"] if r["method"] != "FP"]
    rows.sort(key=lambda r: (-r["target_nfc"], list(METHODS).index(r["method"]) if r["method"] in METHODS else -1))
    print_table(rows)
    checks = acceptance(rows)
    write_json(out, {"rows": rows, "acceptance": checks, "complete": all(rep.get("complete") for rep in reports),
                     "runs": reports})
    if plot_path:
        plot(rows, plot_path)


def acceptance(rows: list[dict]) -> dict:
    """The issue's acceptance checks, computed from the rows (nothing is tuned here)."""
    by = {(r["method"], r["target_nfc"]): r for r in rows}
    out = {}
    for t in sorted({r["target_nfc"] for r in rows if r["method"] == "RFC"}, reverse=True):
        rfc, ts, fora = by.get(("RFC", t)), by.get(("TaylorSeer", t)), by.get(("FORA", t))
        d = {"rfc_nfc": rfc["nfc"]}
        if ts:
            d.update(rfc_fid_to_fp=rfc["fid_to_fp"], taylorseer_fid_to_fp=ts["fid_to_fp"],
                     rfc_le_taylorseer=rfc["fid_to_fp"] <= ts["fid_to_fp"])
        if fora and "latency_s" in rfc and "latency_s" in fora:
            d.update(rfc_overhead_over_fora=rfc["latency_s"] / fora["latency_s"] - 1,
                     rfc_latency_nfc=rfc.get("latency_nfc"), rfc_latency_ratio=rfc["latency_ratio"],
                     fora_latency_ratio=fora["latency_ratio"])
        out[str(t)] = d
    for t, d in out.items():
        print(f"NFC {t}: " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items()))
    return out


def print_table(rows: list[dict]) -> None:
    keys = ("method", "nfc", "fid_to_fp", "psnr", "ssim", "class_accuracy", "fid_data", "latency_ratio")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append(v if isinstance(v, str) else "-" if v is None else f"{v:.4g}" if k != "nfc" else f"{v:.1f}")
        print("| " + " | ".join(cells) + " |")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name in METHODS:
        pts = sorted((r["nfc"], r["fid_to_fp"]) for r in rows if r["method"] == name)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xlabel("NFC (full computations of 50 steps)")
    ax.set_ylabel("FID to full precision (lower is better)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    run_cli(main)
