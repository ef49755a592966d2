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
Any recipe works (latent and text models: images decoded by the VAE, pools and calibration conditioned like the
compress pipeline's). FID-to-FP needs the digits judge; elsewhere it is null and the tables compare PSNR. A row that
fails (out of memory, an untunable cache) keeps its error in the row (``"error"``) and the run goes on.
Heavy at the defaults: wrap it in ``flock /tmp/qcache-cpu.lock``.
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

import torch
from common import (
    DIGITS_RECIPE,
    ROW_ERRORS,
    RecipeModel,
    fmt,
    markdown_table,
    one_line,
    quality_key,
    run_cli,
    run_row,
    write_json,
)
from common import log as _log

from calibration.collect import collect_for_recipe  # noqa: E402
from calibration.select import covered_bins, select_from_config  # noqa: E402
from qcache.cache import replay, tune_tau  # noqa: E402
from qcache.errors import QcacheError  # noqa: E402
from qcache.quant import checkpoint_bytes, quantize_transformer, save_quantized  # noqa: E402
from qcache.recipe import QuantConfig  # noqa: E402
from qcache.sampling import Sampler  # noqa: E402

PRESET_BITS = {"W8A8": ("int8", "int8"), "W4A8": ("int4", "int8"), "W8": ("int8", "none"), "W4": ("int4", "none"),
               "none": ("fp32", "fp32")}


def log(msg: str) -> None:
    _log(msg, err=True)


class Bench:
    """The FP reference, the cache schedule and the pools of one recipe, and every quantized row measured on them."""

    def __init__(self, args) -> None:
        self.args = args
        self.rm = RecipeModel.load(args.recipe, device="cpu")
        self.recipe = self.rm.recipe
        self.fp, self.sched = self.rm.transformer, self.rm.scheduler_config
        self.n, self.seed = args.n, self.recipe.sampling.seed
        self.schedule = None
        self.schedule_error: str | None = None
        self.rows: list[dict] = []

    def generate(self, model, cached: bool):
        """n images (decoded to pixels) of ``model``, with the tuned schedule replayed when ``cached``."""
        if cached and self.schedule is None:
            raise QcacheError(f"cache: no schedule to replay ({self.schedule_error})")
        s = Sampler(model, self.sched, self.recipe.sampling, conditioner=self.rm.conditioner)
        cache = replay(s, self.schedule, self.recipe.cache) if cached else None
        try:
            t0 = time.perf_counter()
            out = s.sample(self.n, seed=self.seed, progress=False)
            took = time.perf_counter() - t0
        finally:
            if cache is not None:
                cache.remove()
        nfc = cache.stats.mean_nfc() if cache is not None else self.recipe.sampling.steps
        return self.rm.pixels(out), nfc, took

    def measure(self, make_model, cached: bool, **row) -> dict:
        """One row: ``make_model()`` -> (model, extra row fields), sampled and compared with the reference. A row
        that fails keeps its error (``"error"``) and the benchmark goes on."""
        row = {**row, "cache": "rfc" if cached else "none"}

        def fill() -> dict:
            model, extra = make_model()
            samples, nfc, took = self.generate(model, cached)
            return {**extra, "nfc": nfc, **self.rm.compare(self.ref, samples), "sample_s": round(took, 2)}

        run_row(row, fill, label=f"{row.get('weights')}/{row.get('activations')} {row.get('variant')}")
        self.rows.append(row)
        if self.args.json:  # partial results survive an interrupted run
            write_json(Path(self.args.json).with_suffix(".partial.json"), {"rows": self.rows})
        log("  ".join(f"{k}={fmt(v)}" for k, v in row.items()))
        return row

    def quantized(self, cfg: QuantConfig, calib):
        t0 = time.perf_counter()
        q = quantize_transformer(copy.deepcopy(self.fp), cfg, calib, guidance=self.recipe.sampling.guidance_scale > 1,
                                 conditioner=self.rm.conditioner)
        return q, time.perf_counter() - t0

    def run(self) -> dict:
        a, cal = self.args, self.recipe.calibration
        t0 = time.perf_counter()
        self.ref = self.rm.pixels(self.rm.sampler().sample(self.n, seed=self.seed, progress=False))
        fp_s = time.perf_counter() - t0
        log(f"FP reference: {self.n} images in {fp_s:.1f}s")
        same = self.rm.compare(self.ref, self.ref)
        self.rows.append({"weights": "fp32", "activations": "fp32", "selector": "-", "calib_size": 0,
                          "pool": "-", "variant": "reference", "cache": "none",
                          "nfc": self.recipe.sampling.steps, **same,
                          "fid_to_fp": None if same["fid_to_fp"] is None else 0.0, "psnr": 100.0, "ssim": 1.0,
                          "sample_s": round(fp_s, 2)})
        cc = self.recipe.cache
        tau = None
        try:
            tuned = tune_tau(self.rm.sampler(), cc, cc.target_nfc)
            self.schedule, tau = tuned.schedule, tuned.tau
            log(f"tau={tau:.4g} -> static schedule NFC {self.schedule.nfc}: {list(self.schedule.full_steps)}")
        except ROW_ERRORS as exc:  # every cached row records it; the uncached ones still run
            self.schedule_error = one_line(exc)
            log(f"cache tuning failed: {self.schedule_error}")
        self.measure(lambda: (self.fp, {}), True, weights="fp32", activations="fp32", selector="-", calib_size=0,
                     pool="-", variant="cache only")

        t0 = time.perf_counter()
        pool, _ = collect_for_recipe(self.recipe, images=a.pool_images, transformer=self.fp,
                                     scheduler_config=self.sched, use_cache=self.schedule is not None,
                                     conditioner=self.rm.conditioner)
        pool_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        naive, _ = collect_for_recipe(self.recipe, images=a.pool_images, transformer=self.fp,
                                      scheduler_config=self.sched, use_cache=False, conditioner=self.rm.conditioner)
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
                method, size, pool_name = "-", 0, "-"

            def make():
                sel, sel_s = (None, 0.0) if act == "none" else selection(pool_name, method, size, seed)
                q, q_s = self.quantized(cfg, sel)
                extra = {"quantize_s": round(q_s, 2)}
                if sel is not None:
                    cov, bins = covered_bins(pools[pool_name], sel)
                    extra.update({"select_s": round(sel_s, 2), "time_bins": f"{cov}/{bins}"})
                return q, extra

            return self.measure(make, cached, weights=w, activations=act, selector=method, calib_size=size,
                                pool=pool_name, variant=variant, selection_seed=seed)

        for preset in a.presets:
            for size in a.sizes:
                for method in a.selectors:
                    for seed in range(a.selection_seeds):
                        q_row(preset, "cache-aware", method, size, True, seed=seed)
        head = {"command": " ".join(sys.argv), "n": self.n, "family": self.rm.parts.family.name, "tau": tau,
                "nfc": self.schedule.nfc if self.schedule is not None else None,
                "schedule_error": self.schedule_error}
        if a.no_extras:
            return {**head, "observer": self.recipe.quant.observer, "rows": self.rows, "checkpoints": []}
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
            **head, "seed": self.seed, "steps": self.recipe.sampling.steps,
            "model_source": self.recipe.model.source, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "full_steps": list(self.schedule.full_steps) if self.schedule is not None else None,
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
                    def size(preset=preset, kw=kw) -> dict:
                        q, _ = self.quantized(replace(self.recipe.quant, preset=preset, **kw), calib)
                        b = checkpoint_bytes(save_quantized(q, Path(d) / f"{preset}-{len(out)}"))
                        return {"bytes": b, "ratio": fp32 / b}

                    row = run_row({"preset": preset, "variant": variant}, size, label=f"checkpoint {preset}")
                    out.append(row)
                    if "error" not in row:
                        log(f"checkpoint {preset} ({variant}): {row['bytes']} bytes, {row['ratio']:.2f}x smaller "
                            f"than fp32")
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
    """The rows, the means over selection seeds (quality: FID-to-FP where the rows have it, else PSNR) and the
    checkpoint sizes, as Markdown."""
    rows = result["rows"]
    cols = ["weights", "activations", "cache", "nfc", "pool", "selector", "calib_size", "variant", "fid_to_fp",
            "psnr", "ssim", "class_accuracy", "fid_data"] + (["error"] if any("error" in r for r in rows) else [])
    lines = [markdown_table(rows, cols)]
    lines += ["", "Mean over selection seeds (W*A8 + RFC, cache-aware pool):", "",
              "| weights | calib_size | selector | seeds | fid_to_fp mean | psnr mean | class_accuracy mean |",
              "|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        if (r.get("activations") == "int8" and r.get("pool") == "cache-aware" and r.get("variant") == "default"
                and "error" not in r):
            groups.setdefault((r["weights"], r["calib_size"], r["selector"]), []).append(r)

    def mean(rs: list[dict], k: str) -> float | None:
        vals = [x[k] for x in rs if x.get(k) is not None]
        return sum(vals) / len(vals) if len(vals) == len(rs) else None

    for (w, size, sel), rs in groups.items():
        lines.append(f"| {w} | {size} | {sel} | {len(rs)} | {fmt(mean(rs, 'fid_to_fp'))} | {fmt(mean(rs, 'psnr'))} | "
                     f"{fmt(mean(rs, 'class_accuracy'))} |")
    lines += ["", "| preset | variant | bytes | × smaller than fp32 |", "|---|---|---|---|"]
    for c in result["checkpoints"]:
        lines.append(f"| {c['preset']} | {c['variant']} | {c.get('bytes', c.get('error'))} | "
                     f"{fmt(c.get('ratio'), 3)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(DIGITS_RECIPE))
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
    result["quality"] = quality_key(result["rows"])
    print(table(result))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    run_cli(main)
