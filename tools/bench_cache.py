"""Benchmark of the feature caches on a recipe's model: quality against full precision and measured speed-up.

    python tools/bench_cache.py --n 500 --json runs/bench_cache.json [--plot docs/bench_cache.png]
    python tools/bench_cache.py --recipe recipes/pixart-alpha-512.yaml --n 16 --targets 14,10 --json runs/bc.json

For every target NFC (25, 17, 14, 10, 8) it runs FORA, TaylorSeer (m=2), RFE-only (fixed, evenly spread full
steps), RCS-only (TaylorSeer forecasts, tau tuned) and RFC (m=2, tau tuned). Every method samples the same n images
from the same noise as the full-precision (FP) reference. Fixed schedules place exactly NFC full steps; RCS methods
get their schedule as ``qcache.compress`` does (``resolve_cache``): tau by bisection on a separate calibration batch
(seed ``--tune-seed``), run live when a tau gives exactly the target within the gap bound, otherwise exactly NFC full
steps chosen on the calibration batch's error trace and replayed (``schedule_method`` in the row). Latency: every
configuration, FP included, is timed in interleaved rounds in this same run (``qcache.evaluate.interleaved_times``);
``latency_ratio`` = median FP time / median time of the method.

Any recipe works, latent and text models included: latents are decoded by the model's VAE before they are compared.
FID-to-FP needs the digits judge; elsewhere it is null and the acceptance block compares PSNR. A configuration that
fails (a target no tau reaches, out of memory) keeps its error in its row (``"error"``) and the run goes on.
``--granularity module,block,span`` repeats every configuration at each ``cache.granularity``.

cache-dit side by side (``pip install -e '.[compare]'``; without it these rows are skipped with one message line):
``cache-dit DBCache`` and ``cache-dit DBCache+TaylorSeer`` (its calibrator, order 1) at every
``--cachedit-thresholds`` value (``residual_diff_threshold``), ``Fn_compute_blocks`` 1 and ``Bn_compute_blocks`` 0
(cache-dit's default); see tools/cachedit_rows.py for how it is attached. The comparison is fair by construction:
cache-dit is attached to the transformer of the same ``Sampler`` object, so it samples the same noise, labels,
scheduler and CFG batch as every other row; its warm-up equals the others' (``max_warmup_steps`` = ``--warmup``); its
context is fresh for every batch; its latency is measured in the same interleaved rounds as FP and every qcache
method (attach and detach inside the timed call, as for qcache), so the first block it always computes, its residual
check and its calibrator are all in its cost, never derived from its NFC. Its rows record ``threshold`` and the
measured ``nfc`` (steps minus cache-dit's own cached-steps count). ``--plot`` adds ``<plot>-latency.png``: quality
against measured latency ratio, one curve per method; the acceptance block then compares qcache's best and
cache-dit's best at latency ratios 2.0, 2.5 and 3.0, interpolated along each method's measured curve.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cachedit_rows as cdr
import torch
from common import (
    DIGITS_RECIPE,
    ROW_ERRORS,
    RecipeModel,
    better,
    fmt,
    interleaved_times,
    log,
    markdown_table,
    one_line,
    quality_key,
    run_cli,
    run_row,
    write_json,
)

from qcache.cache import executed_flops  # noqa: E402
from qcache.cache.attach import CacheSetup, resolve_cache  # noqa: E402
from qcache.errors import QcacheError  # noqa: E402
from qcache.recipe import CacheConfig, recipe_to_dict  # noqa: E402
from qcache.sampling import Sampler  # noqa: E402

METHODS = {  # name -> cache config (target_nfc filled in per row)
    "FORA": dict(policy="fora"),
    "TaylorSeer": dict(policy="taylorseer", order=2),
    "RFE-only": dict(policy="rfc", order=2, rfe=True, rcs=False),
    "RCS-only": dict(policy="rfc", order=2, rfe=False, rcs=True),
    "RFC": dict(policy="rfc", order=2, rfe=True, rcs=True),
}


def granularities(arg: str | None) -> list[str | None]:
    """The ``--granularity`` list; [None] (the config's default, no key in the rows) when not given. One line of
    error when this qcache's ``CacheConfig`` has no ``granularity`` field."""
    if not arg:
        return [None]
    if "granularity" not in {f.name for f in dataclasses.fields(CacheConfig)}:
        raise QcacheError("--granularity: this qcache's CacheConfig has no granularity field")
    return [g.strip() for g in arg.split(",") if g.strip()]


def cache_config(name: str, target: int, args: argparse.Namespace, granularity: str | None) -> CacheConfig:
    """The cache configuration of one row (``granularity`` set via ``dataclasses.replace`` only when given)."""
    cfg = CacheConfig(**METHODS[name], warmup=args.warmup, target_nfc=target, tune_samples=args.tune_samples,
                      tune_seed=args.tune_seed, compile=args.cache_compile == "on")
    return cfg if granularity is None else dataclasses.replace(cfg, granularity=granularity)


def timed_run(sampler: Sampler, n: int, setup: CacheSetup | cdr.CacheDitSetup | None, nfc_out: list,
              errors: list | None = None) -> Callable[[], None]:
    """A function sampling n images with this cache attached (detached after); it appends the run's NFC to
    ``nfc_out``, or the error of a failed run to ``errors`` (out of memory at the latency batch size, say), after
    which it does nothing. Attaching (registering hooks) is inside the timed call; it costs microseconds."""
    def sample() -> float:
        if setup is None:
            sampler.sample(n, progress=False)
            return float(sampler.config.steps)
        with setup.attach(sampler) as cache:
            sampler.sample(n, progress=False)
        return cache.stats.mean_nfc()

    def run() -> None:
        if errors:
            return
        try:
            nfc_out.append(sample())
        except ROW_ERRORS as exc:
            if errors is None:
                raise
            errors.append(one_line(exc))
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(DIGITS_RECIPE))
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
    ap.add_argument("--device", default=None, help="override the recipe's model.device")
    ap.add_argument("--granularity", default=None, metavar="LIST",
                    help="comma-separated cache.granularity values (module, block, span): every method at each")
    ap.add_argument("--cache-compile", choices=("off", "on"), default="off",
                    help="cache.compile for every method: the cached steps' arithmetic through torch.compile "
                         "(qcache/cache/fused.py); each configuration then gets one untimed round first")
    ap.add_argument("--cachedit-thresholds", default="0.04,0.08,0.12,0.2,0.3", metavar="LIST",
                    help="cache-dit's residual_diff_threshold values, one row per method each ('' for none)")
    ap.add_argument("--cachedit-methods", default=",".join(cdr.METHODS), metavar="LIST",
                    help="which cache-dit methods (comma-separated)")
    ap.add_argument("--plot", default=None, help="PNG of FID-to-FP (PSNR off the digits judge) against NFC, and "
                    "<plot>-latency.png of quality against measured latency ratio")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only combine the rows of earlier runs (each keeps the latency ratio of its own run)")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.json, args.plot)
    methods = [m for m in args.methods.split(",") if m]
    if unknown := [m for m in methods if m not in METHODS]:
        raise QcacheError(f"--methods: unknown method {unknown[0]!r} (choose from {', '.join(METHODS)})")
    try:
        targets = [int(t) for t in args.targets.split(",") if t]
    except ValueError:
        raise QcacheError(f"--targets: comma-separated integers, got {args.targets!r}") from None
    if args.n < 2 or args.latency_samples < 1 or args.repeats < 1:
        raise QcacheError("--n must be >= 2, --latency-samples and --repeats >= 1")
    grans = granularities(args.granularity)
    cd_methods = [m for m in args.cachedit_methods.split(",") if m]
    if unknown := [m for m in cd_methods if m not in cdr.METHODS]:
        raise QcacheError(f"--cachedit-methods: unknown method {unknown[0]!r} (choose from {', '.join(cdr.METHODS)})")
    try:
        cd_thresholds = [float(t) for t in args.cachedit_thresholds.split(",") if t.strip()]
    except ValueError:
        raise QcacheError(f"--cachedit-thresholds: comma-separated numbers, got {args.cachedit_thresholds!r}") from None
    if any(t <= 0 for t in cd_thresholds):
        raise QcacheError("--cachedit-thresholds: every threshold must be > 0")

    rm = RecipeModel.load(args.recipe, source=args.source, device=args.device)
    sampler = rm.sampler(batch_size=max(args.n, args.latency_samples, args.tune_samples))
    sampling = sampler.config
    torch.manual_seed(0)

    log(f"FP reference: {args.n} samples, {sampling.steps} {sampling.scheduler} steps, "
        f"threads={torch.get_num_threads()}")
    fp_latents, fp_flops = executed_flops(lambda: sampler.sample(args.n, progress=False))
    fp = rm.pixels(fp_latents)
    rows = [{"method": "FP", "target_nfc": sampling.steps, "nfc": float(sampling.steps), "tau": None,
             **rm.compare(fp, fp), "flops_per_image": fp_flops / args.n, "cache_bytes_per_image": 0.0}]
    configs: list[tuple[dict, CacheSetup | None]] = [(rows[0], None)]

    for target in targets:
        for gran in grans:
            for name in methods:
                row = {"method": name, "target_nfc": target, **({} if gran is None else {"granularity": gran})}
                label = f"{name} target {target}" + ("" if gran is None else f" ({gran})")
                cfg = cache_config(name, target, args, gran)
                setups: list[CacheSetup] = []
                run_row(row, lambda cfg=cfg, setups=setups: measure(rm, sampler, fp, cfg, args.n, setups), label)
                rows.append(row)
                if "error" not in row:
                    configs.append((row, setups[0]))
                    log(f"{label}: nfc {row['nfc']:.1f} fid_to_fp {fmt(row['fid_to_fp'])} psnr {fmt(row['psnr'])} "
                        f"acc {fmt(row['class_accuracy'])} fid_data {fmt(row['fid_data'])}"
                        + (f" tau {row['tau']:.4g}" if row["tau"] is not None else ""))
                write_json(args.json, {"rows": rows, "complete": False})

    cachedit = {"thresholds": cd_thresholds, "methods": cd_methods, "version": None}
    if cd_thresholds and cd_methods:
        cd = cdr.import_cache_dit()
        if cd is None:
            log(cdr.MISSING)
            cachedit["skipped"] = cdr.MISSING
        else:
            cachedit["version"] = getattr(cd, "__version__", None)
            for name, setup in cdr.setups(cd_thresholds, args.warmup, cd_methods):
                row = {"method": name, "target_nfc": None, **cdr.row_fields(setup)}
                label = f"{name} threshold {setup.threshold:g}"
                run_row(row, lambda setup=setup: measure_cachedit(rm, sampler, fp, setup, args.n), label)
                rows.append(row)
                if "error" not in row:
                    configs.append((row, setup))
                    log(f"{label}: nfc {row['nfc']:.1f} fid_to_fp {fmt(row['fid_to_fp'])} psnr {fmt(row['psnr'])} "
                        f"acc {fmt(row['class_accuracy'])} fid_data {fmt(row['fid_data'])}")
                write_json(args.json, {"rows": rows, "complete": False})

    log(f"latency: {len(configs)} configurations x {args.repeats} rounds of {args.latency_samples} images")
    nfcs: list[list[float]] = [[] for _ in configs]
    errors: list[list[str]] = [[] for _ in configs]
    runs = [timed_run(sampler, args.latency_samples, setup, out, err)
            for (_, setup), out, err in zip(configs, nfcs, errors)]
    warm = [timed_run(sampler, 2, None, [])]
    if args.cache_compile == "on":  # compiled graphs are specific to the batch shape: compile them untimed
        warm += runs[1:]
    times = interleaved_times(runs, args.repeats, warmup=warm, device=sampler.device)
    fp_time = statistics.median(times[0]) if not errors[0] else None
    for (row, _), ts, nfc, err in zip(configs, times, nfcs, errors):
        if err or fp_time is None:
            row["latency_error"] = err[0] if err else f"FP: {errors[0][0]}"
            continue
        row["latency_s"] = statistics.median(ts)
        row["latency_runs_s"] = ts
        row["latency_nfc"] = nfc[-1]
        row["latency_ratio"] = fp_time / row["latency_s"]

    report = {
        "rows": rows, "complete": True, "n": args.n, "steps": sampling.steps, "scheduler": sampling.scheduler,
        "guidance_scale": sampling.guidance_scale, "seed": sampling.seed, "warmup": args.warmup,
        "latency_samples": args.latency_samples, "repeats": args.repeats, "tune_samples": args.tune_samples,
        "tune_seed": args.tune_seed, "cache_compile": args.cache_compile == "on", "device": str(sampler.device),
        "family": rm.parts.family.name, "quality": quality_key(rows),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "command": " ".join(sys.argv),
        "recipe": recipe_to_dict(rm.recipe), "cachedit": cachedit,
    }
    print_table(rows)
    report["acceptance"] = acceptance(rows)
    write_json(args.json, report)
    if args.plot:
        plot(rows, args.plot)


def measure(rm: RecipeModel, sampler: Sampler, fp, cfg: CacheConfig, n: int, setups: list) -> dict:
    """One method's quality row, the cache set up exactly as ``qcache.compress`` does (``resolve_cache``: RCS
    methods get an exact-NFC schedule, from a tuned tau run live or chosen on the error trace and replayed), n
    images from the reference noise, compared with it. The setup is appended to ``setups`` for the timed runs."""
    t0 = time.perf_counter()
    setup = resolve_cache(sampler, cfg)
    tune = {}
    if setup.tuned is not None:
        t = setup.tuned
        tune = {"tune_nfc": t.nfc, "tune_probes": len(t.probes), "tune_s": time.perf_counter() - t0,
                "schedule_method": t.method}
    with setup.attach(sampler) as cache:
        out, flops = executed_flops(lambda: sampler.sample(n, progress=False))
    setups.append(setup)
    stats = cache.stats.report()
    return {"nfc": stats["nfc"], "tau": setup.tau, **rm.compare(fp, rm.pixels(out)), "flops_per_image": flops / n,
            "cache_bytes_per_image": stats["cache_bytes_per_image"], "full_steps": stats["full_steps"], **tune}


def measure_cachedit(rm: RecipeModel, sampler: Sampler, fp, setup: cdr.CacheDitSetup, n: int) -> dict:
    """One cache-dit row: n images from the reference noise through the same sampler with cache-dit attached,
    compared with FP; ``nfc`` is measured from cache-dit's cached-steps count."""
    with setup.attach(sampler) as cache:
        out, flops = executed_flops(lambda: sampler.sample(n, progress=False))
    return {**cache.stats.report(), "tau": None, **rm.compare(fp, rm.pixels(out)), "flops_per_image": flops / n,
            "cache_bytes_per_image": None}


def merge(paths: list[str], out: str, plot_path: str | None) -> None:
    """Combine the reports of several runs (e.g. one per group of targets) into one table and plot."""
    import json

    reports = [json.loads(Path(p).read_text()) for p in paths]
    rows = [reports[0]["rows"][0]] + [r for rep in reports for r in rep["rows"] if r["method"] != "FP"]
    order = [*METHODS, *cdr.METHODS]
    rows.sort(key=lambda r: (r["target_nfc"] is None, -(r["target_nfc"] or 0),
                             order.index(r["method"]) if r["method"] in order else -1, r.get("threshold") or 0))
    print_table(rows)
    checks = acceptance(rows)
    write_json(out, {"rows": rows, "acceptance": checks, "complete": all(rep.get("complete") for rep in reports),
                     "runs": reports})
    if plot_path:
        plot(rows, plot_path)


def acceptance(rows: list[dict]) -> dict:
    """The issue's acceptance checks, computed from the rows (nothing is tuned here): per target NFC (and
    granularity), RFC's quality against TaylorSeer's (FID-to-FP where the rows have it, else PSNR) and RFC's
    latency against FORA's. Rows that failed are left out."""
    key = quality_key(rows)
    by = {(r["method"], r["target_nfc"], r.get("granularity")): r for r in rows if "error" not in r}
    out = {}
    for t, g in sorted({(k[1], k[2]) for k in by if k[0] == "RFC"}, key=lambda k: (-k[0], str(k[1]))):
        rfc, ts, fora = by[("RFC", t, g)], by.get(("TaylorSeer", t, g)), by.get(("FORA", t, g))
        d = {"rfc_nfc": rfc["nfc"], "quality": key}
        if ts:
            name = "le" if key.startswith("fid") else "ge"
            d.update({f"rfc_{key}": rfc[key], f"taylorseer_{key}": ts[key],
                      f"rfc_{name}_taylorseer": better(key, rfc[key], ts[key])})
        if fora and "latency_s" in rfc and "latency_s" in fora:
            d.update(rfc_overhead_over_fora=rfc["latency_s"] / fora["latency_s"] - 1,
                     rfc_latency_nfc=rfc.get("latency_nfc"), rfc_latency_ratio=rfc["latency_ratio"],
                     fora_latency_ratio=fora["latency_ratio"])
        out[str(t) if g is None else f"{t}/{g}"] = d
    for t, d in out.items():
        print(f"NFC {t}: " + "  ".join(f"{k}={fmt(v)}" for k, v in d.items()))
    if any(cdr.is_cachedit(r["method"]) for r in rows):
        out["cachedit"] = cdr.latency_comparison(rows)
        for ratio, d in out["cachedit"].items():
            print(f"latency {ratio}x: " + "  ".join(f"{k}={fmt(v)}" for k, v in d.items() if k != "methods"))
    return out


def print_table(rows: list[dict]) -> None:
    keys = ["method", "nfc", "fid_to_fp", "psnr", "ssim", "class_accuracy", "fid_data", "latency_ratio"]
    if any("granularity" in r for r in rows):
        keys.insert(1, "granularity")
    if any("threshold" in r for r in rows):
        keys.insert(1, "threshold")
    if any("error" in r for r in rows):
        keys.append("error")
    print(markdown_table(rows, keys, formats={"nfc": lambda v: "-" if v is None else f"{v:.1f}"}))


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = quality_key(rows)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name in METHODS:
        for g in sorted({r.get("granularity") for r in rows if r["method"] == name}, key=str):
            pts = sorted((r["nfc"], r[key]) for r in rows
                         if r["method"] == name and r.get("granularity") == g and "error" not in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name if g is None else f"{name} ({g})")
    steps = next((r["target_nfc"] for r in rows if r["method"] == "FP"), None)
    ax.set_xlabel(f"NFC (full computations of {steps} steps)")
    if key == "fid_to_fp":
        ax.set_ylabel("FID to full precision (lower is better)")
        ax.set_yscale("log")
    else:
        ax.set_ylabel("PSNR to full precision, dB (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    if any("latency_ratio" in r for r in rows):
        p = Path(path)
        cdr.plot_latency(rows, str(p.with_name(f"{p.stem}-latency{p.suffix}")))


if __name__ == "__main__":
    run_cli(main)
