"""Benchmark PTQ + cache-aware calibration on a recipe's model (default: the embedded digits DiT).

    python tools/bench_quant.py --n 500 --json runs/bench_quant.json [--recipe recipes/digits.yaml]

Everything is measured against the full-precision, uncached reference generated from the same noise:
  1. tau of the recipe's RFC cache is tuned to its target NFC on the FP model; the full-step mask it gives is
     replayed (RFE forecasting on) for every compressed row, so all cached rows have the same NFC;
  2. the calibration pool is sampled with that cache active (FP weights, calibration.pool_seed), plus an
     uncached pool (every step) for the no-cache row and the naive-pool baseline;
  3. for every preset x calibration size x selector: select, quantize a copy of the FP model with our
     observers, sample n images with the cache, and compare with the reference (FID-to-FP, PSNR, SSIM) and
     with the data (class accuracy, FID);
  4. W8A8 without caching; weight-only W8/W4; the literal "keep conditioning in fp32" variant;
  5. checkpoint bytes per preset against the fp32 safetensors; TAP selection time on a 20 000-row pool.
Heavy: wrap it in ``flock /tmp/qcache-cpu.lock``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.collect import collect_for_recipe  # noqa: E402
from calibration.select import column, covered_bins, select_from_config  # noqa: E402
from qcache.cache import replay, tune_tau  # noqa: E402
from qcache.cli import run_cli, write_json  # noqa: E402
from qcache.evaluate import quality_metrics  # noqa: E402
from qcache.metrics import compare_sets  # noqa: E402
from qcache.models import load_model  # noqa: E402
from qcache.quant import checkpoint_bytes, quantize_transformer, save_quantized  # noqa: E402
from qcache.recipe import QuantConfig, load_recipe  # noqa: E402
from qcache.sampling import Sampler  # noqa: E402

PRESET_BITS = {"W8A8": ("int8", "int8"), "W4A8": ("int4", "int8"), "W8": ("int8", "none"), "W4": ("int4", "none"),
               "none": ("fp32", "fp32")}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.recipe = load_recipe(args.recipe)
        loaded = load_model(replace(self.recipe.model, device="cpu"))
        self.fp, self.sched = loaded.transformer, loaded.scheduler_config
        self.n, self.seed = args.n, self.recipe.sampling.seed
        self.schedule = None
        self.rows: list[dict] = []

    def sampler(self, model, cached: bool) -> Sampler:
        s = Sampler(model, self.sched, self.recipe.sampling)
        if cached:
            replay(s, self.schedule, self.recipe.cache)
        return s

    def generate(self, model, cached: bool):
        s = self.sampler(model, cached)
        t0 = time.perf_counter()
        out = s.sample(self.n, seed=self.seed, progress=False)
        took = time.perf_counter() - t0
        nfc = self.schedule.nfc if cached else self.recipe.sampling.steps
        for h in s.hooks:
            if hasattr(h, "stats"):
                nfc = h.stats.mean_nfc()
            if hasattr(h, "remove"):
                h.remove()
        return out, nfc, took

    def measure(self, model, cached: bool, **row) -> dict:
        samples, nfc, took = self.generate(model, cached)
        m = {**compare_sets(self.ref.images, samples.images), **quality_metrics(samples)}
        row = {**row, "cache": "rfc" if cached else "none", "nfc": nfc, **m, "sample_s": round(took, 2)}
        self.rows.append(row)
        if self.args.json:  # partial results survive an interrupted run
            write_json(Path(self.args.json).with_suffix(".partial.json"), {"rows": self.rows})
        log("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        return row

    def quantized(self, cfg: QuantConfig, calib):
        t0 = time.perf_counter()
        q = quantize_transformer(copy.deepcopy(self.fp), cfg, calib)
        return q, time.perf_counter() - t0

    def run(self) -> dict:
        a, cal = self.args, self.recipe.calibration
        t0 = time.perf_counter()
        self.ref = Sampler(self.fp, self.sched, self.recipe.sampling).sample(self.n, seed=self.seed, progress=False)
        fp_s = time.perf_counter() - t0
        log(f"FP reference: {self.n} images in {fp_s:.1f}s")
        self.rows.append({"weights": "fp32", "activations": "fp32", "selector": "-", "calib_size": 0,
                          "pool": "-", "variant": "reference", "cache": "none",
                          "nfc": self.recipe.sampling.steps, **quality_metrics(self.ref),
                          "fid_to_fp": 0.0, "psnr": 100.0, "ssim": 1.0, "sample_s": round(fp_s, 2)})
        cc = self.recipe.cache
        tuned = tune_tau(Sampler(self.fp, self.sched, self.recipe.sampling), cc, cc.target_nfc)
        self.schedule = tuned.schedule
        log(f"tau={tuned.tau:.4g} -> static schedule NFC {self.schedule.nfc}: {list(self.schedule.full_steps)}")
        self.measure(self.fp, True, weights="fp32", activations="fp32", selector="-", calib_size=0, pool="-",
                     variant="cache only")

        t0 = time.perf_counter()
        pool, _ = collect_for_recipe(self.recipe, images=a.pool_images, transformer=self.fp,
                                     scheduler_config=self.sched, use_cache=True)
        pool_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        naive, _ = collect_for_recipe(self.recipe, images=a.pool_images, transformer=self.fp,
                                      scheduler_config=self.sched, use_cache=False)
        naive_s = time.perf_counter() - t0
        log(f"pools: cache-aware {len(pool)} rows ({pool_s:.1f}s), uncached {len(naive)} rows ({naive_s:.1f}s)")
        pools = {"cache-aware": pool, "uncached": naive}

        selections = {}

        def selection(pool_name: str, method: str, size: int, seed: int):
            key = (pool_name, method, size, seed)
            if key not in selections:
                t1 = time.perf_counter()
                sel = select_from_config(pools[pool_name], cal, method=method, size=size, seed=seed)
                selections[key] = (sel, time.perf_counter() - t1)
            return selections[key]

        def q_row(preset: str, pool_name: str, method: str, size: int, cached: bool, variant: str = "default",
                  seed: int = 0, **cfg_kw):
            cfg = replace(self.recipe.quant, preset=preset, **cfg_kw)
            w, act = PRESET_BITS[preset]
            if act == "none":
                sel, sel_s, method, size, pool_name = None, 0.0, "-", 0, "-"
            else:
                sel, sel_s = selection(pool_name, method, size, seed)
            q, q_s = self.quantized(cfg, sel)
            extra = {}
            if sel is not None:
                cov, bins = covered_bins(pools[pool_name], sel)
                extra = {"select_s": round(sel_s, 2), "time_bins": f"{cov}/{bins}"}
            return self.measure(q, cached, weights=w, activations=act, selector=method, calib_size=size,
                                pool=pool_name, variant=variant, selection_seed=seed, quantize_s=round(q_s, 2),
                                **extra)

        for preset in a.presets:
            for size in a.sizes:
                for method in a.selectors:
                    for seed in range(a.selection_seeds):
                        q_row(preset, "cache-aware", method, size, True, seed=seed)
        if a.no_extras:
            return {"command": " ".join(sys.argv), "n": self.n, "nfc": self.schedule.nfc, "tau": tuned.tau,
                    "observer": self.recipe.quant.observer, "rows": self.rows, "checkpoints": []}
        q_row("W8A8", "uncached", "tap", max(a.sizes), False)
        q_row("W8A8", "uncached", "tap", max(a.sizes), True, variant="naive pool")
        for preset in ("W8", "W4"):
            q_row(preset, "-", "-", 0, True)
        q_row("W8A8", "cache-aware", "tap", max(a.sizes), True, variant="conditioning fp32, keep fp32",
              conditioning_weights="none", keep_dtype="float32")
        q_row("W8", "-", "-", 0, True, variant="conditioning fp32, keep fp32", conditioning_weights="none",
              keep_dtype="float32")
        q_row("W8", "-", "-", 0, True, variant="keep fp32", keep_dtype="float32")

        checkpoints = self.checkpoints(selection("cache-aware", "tap", max(a.sizes), 0)[0])
        timing = self.tap_timing(naive, pool)
        return {
            "command": " ".join(sys.argv),
            "n": self.n, "seed": self.seed, "steps": self.recipe.sampling.steps,
            "model_source": self.recipe.model.source, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "tau": tuned.tau, "full_steps": list(self.schedule.full_steps), "nfc": self.schedule.nfc,
            "pool_images": a.pool_images, "pool_rows": {"cache-aware": len(pool), "uncached": len(naive)},
            "pool_seconds": {"cache-aware": round(pool_s, 1), "uncached": round(naive_s, 1)},
            "rows": self.rows, "checkpoints": checkpoints, "tap_timing": timing,
        }

    def checkpoints(self, calib) -> list[dict]:
        from safetensors.torch import save

        fp32 = len(save({k: v.detach().float().contiguous() for k, v in self.fp.state_dict().items()}))
        out = [{"preset": "fp32", "variant": "-", "bytes": fp32, "ratio": 1.0}]
        variants = [("default", {})] + [("conditioning fp32, keep fp32",
                                         {"conditioning_weights": "none", "keep_dtype": "float32"}),
                                        ("keep fp32", {"keep_dtype": "float32"})]
        with tempfile.TemporaryDirectory() as d:
            for preset in ("W8A8", "W4A8", "W8", "W4"):
                for variant, kw in variants:
                    q, _ = self.quantized(replace(self.recipe.quant, preset=preset, **kw), calib)
                    b = checkpoint_bytes(save_quantized(q, Path(d) / f"{preset}-{len(out)}"))
                    out.append({"preset": preset, "variant": variant, "bytes": b, "ratio": fp32 / b})
                    log(f"checkpoint {preset} ({variant}): {b} bytes, {fp32 / b:.2f}x smaller than fp32")
        return out

    def tap_timing(self, naive, cached_pool) -> dict:
        """TAP selection time on 20 000 real pool rows (the uncached pool, cut) and on the cache-aware pool."""
        cal = self.recipe.calibration
        out = {}
        big = naive.select(range(min(len(naive), self.args.tap_rows)))
        for name, ds in (("uncached pool cut", big), ("cache-aware pool", cached_pool)):
            t0 = time.perf_counter()
            sel = select_from_config(ds, cal, method="tap", size=256, seed=0)
            took = time.perf_counter() - t0
            out[name] = {"pool_rows": len(ds), "selected": len(sel), "seconds": round(took, 2)}
            log(f"TAP on {len(ds)} rows: {took:.2f}s")
        return out


def table(result: dict) -> str:
    cols = ["weights", "activations", "cache", "nfc", "pool", "selector", "calib_size", "variant", "fid_to_fp",
            "psnr", "ssim", "class_accuracy", "fid_data"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        vals = []
        for c in cols:
            v = r.get(c, "")
            vals.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(vals) + " |")
    lines += ["", "Mean over selection seeds (W*A8 + RFC, cache-aware pool):", "",
              "| weights | calib_size | selector | seeds | fid_to_fp mean | psnr mean | class_accuracy mean |",
              "|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in result["rows"]:
        if r.get("activations") == "int8" and r.get("pool") == "cache-aware" and r.get("variant") == "default":
            groups.setdefault((r["weights"], r["calib_size"], r["selector"]), []).append(r)
    for (w, size, sel), rs in groups.items():
        mean = lambda k: sum(x[k] for x in rs) / len(rs)  # noqa: E731
        lines.append(f"| {w} | {size} | {sel} | {len(rs)} | {mean('fid_to_fp'):.4g} | {mean('psnr'):.4g} | "
                     f"{mean('class_accuracy'):.4g} |")
    lines += ["", "| preset | variant | bytes | × smaller than fp32 |", "|---|---|---|---|"]
    for c in result["checkpoints"]:
        lines.append(f"| {c['preset']} | {c['variant']} | {c['bytes']} | {c['ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "recipes" / "digits.yaml"))
    ap.add_argument("--n", type=int, default=500, help="images per row (same noise as the FP reference)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--presets", nargs="+", default=["W8A8", "W4A8"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--selectors", nargs="+", default=["random", "kmeans", "tap"])
    ap.add_argument("--selection-seeds", type=int, default=1, help="repeat each selection with seeds 0..K-1")
    ap.add_argument("--pool-images", type=int, default=None, help="default: calibration.pool_images")
    ap.add_argument("--tap-rows", type=int, default=20_000, help="pool rows for the TAP timing")
    ap.add_argument("--observer", choices=["absmax", "percentile"], default=None, help="override quant.observer")
    ap.add_argument("--no-extras", action="store_true", help="only the preset x size x selector rows")
    ap.add_argument("--table-from", default=None, help="only print the tables of a saved result JSON")
    args = ap.parse_args()
    if args.table_from:
        print(table(json.loads(Path(args.table_from).read_text())))
        return
    torch.set_grad_enabled(False)
    import datasets

    datasets.disable_progress_bars()
    bench = Bench(args)
    if args.observer:
        bench.recipe = replace(bench.recipe, quant=replace(bench.recipe.quant, observer=args.observer))
    if args.pool_images is None:
        args.pool_images = bench.recipe.calibration.pool_images
    t0 = time.perf_counter()
    result = bench.run()
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(table(result))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    run_cli(main)
