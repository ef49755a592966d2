"""Q&C-style ablation of qcache on a recipe's model (default: the embedded digits DiT), W8A8 at NFC 14 of 50.

    python tools/ablation.py --n 500 --json docs/results/ablation.json [--recipe recipes/digits.yaml]

Rows, each measured against the full-precision model from the same noise (FID-to-FP, PSNR) and against the data
(FID, class accuracy), with its latency ratio (FP sampling time / the row's, measured in this run) and size ratio
(FP safetensors bytes / the row's checkpoint); every row's latency is timed interleaved with the FP model's:

    fp                 full precision, every step
    ptq                W8A8, naive calibration (random over timesteps from an uncached pool), no cache
    rfc                full precision + RFC
    naive              ptq + FORA (the naive stack)
    +tap               W8A8 calibrated by TAP on a FORA-aware pool, + FORA
    +tap+vc            ... + variance compensation
    rfc_instead_of_fora  ptq (naive calibration) + RFC
    qcache             TAP on an RFC-aware pool + RFC + VC (what python -m qcache.compress builds)

The naive pool has as many rows as the cache-aware ones (fewer images, every step). Heavy: run it alone
(``flock /tmp/qcache-cpu.lock``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcache.cli import run_cli, write_json  # noqa: E402
from qcache.compressed import CompressedModel  # noqa: E402
from qcache.evaluate import quality_metrics, time_interleaved  # noqa: E402
from qcache.metrics import compare_sets  # noqa: E402
from qcache.models import load_model  # noqa: E402
from qcache.pipeline import (build_pool, cache_schedule, fit_variance_compensation, model_bytes,  # noqa: E402
                             quantize_model, select_calibration)
from qcache.quant import checkpoint_bytes, save_quantized  # noqa: E402
from qcache.recipe import CacheConfig, load_recipe  # noqa: E402
from qcache.sampling import Sampler  # noqa: E402

ROWS = ("fp", "ptq", "rfc", "naive", "+tap", "+tap+vc", "rfc_instead_of_fora", "qcache")
KEYS = ("config", "nfc", "fid_to_fp", "fid_data", "class_accuracy", "psnr", "latency_ratio", "size_ratio")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Ablation:
    def __init__(self, args) -> None:
        recipe = load_recipe(args.recipe)
        self.recipe = replace(recipe, model=replace(recipe.model, device="cpu"),
                              quant=replace(recipe.quant, preset="W8A8"),
                              cache=replace(recipe.cache, target_nfc=args.nfc),
                              eval=replace(recipe.eval, n=args.n, latency_samples=args.latency_samples,
                                           latency_repeats=args.repeats))
        loaded = load_model(self.recipe.model)
        self.fp, self.sched = loaded.transformer, loaded.scheduler_config
        self.fp_bytes = model_bytes(self.fp)
        self.rows: list[dict] = []
        self.fora = CacheConfig(policy="fora", target_nfc=args.nfc, warmup=self.recipe.cache.warmup)

    # ---- building blocks ------------------------------------------------------------------------------------
    def pool(self, cache: CacheConfig | None, selector: str):
        """A calibration set: cache-aware pool collected with ``cache`` (None: naive, every step) and a selector."""
        cal, steps = self.recipe.calibration, self.recipe.sampling.steps
        if cache is None:  # naive pool: same number of rows, fewer images
            images = math.ceil(cal.pool_images * self.recipe.cache.target_nfc / steps)
            r = replace(self.recipe, calibration=replace(cal, cache_aware=False, pool_images=images, selector=selector))
        else:
            r = replace(self.recipe, cache=cache, calibration=replace(cal, cache_aware=True, selector=selector))
        t0 = time.perf_counter()
        pool, info = build_pool(r, self.fp, self.sched)
        sel = select_calibration(r, pool)
        log(f"pool ({'naive' if cache is None else cache.policy}-aware) {len(pool)} rows -> {selector} {len(sel)} "
            f"in {time.perf_counter() - t0:.1f}s")
        return sel, info.get("tau")

    def quantized(self, selection):
        model = quantize_model(self.recipe, self.fp, selection)
        with_dir = Path(self.tmp) / f"q{len(self.rows)}"
        save_quantized(model, with_dir)
        return model, checkpoint_bytes(with_dir)

    def compressed(self, model, cache: CacheConfig | None, vc: bool, tau_guess=None) -> CompressedModel:
        r = replace(self.recipe, cache=cache or CacheConfig())
        schedule, _ = cache_schedule(r, model, self.sched, tau_guess)
        cm = CompressedModel(model, self.sched, self.recipe.sampling, r.cache, schedule)
        if vc:
            cm.vc_factors, _ = fit_variance_compensation(self.recipe, cm, self.fp, self.sched)
        return cm

    # ---- one row --------------------------------------------------------------------------------------------
    def measure(self, config: str, cm: CompressedModel, size: int) -> None:
        e = self.recipe.eval
        t0 = time.perf_counter()
        with cm.sampler() as s:
            out = s.sample(e.n, progress=False)
            took = time.perf_counter() - t0
            fp_latency, latency = time_interleaved([self.fp_sampler, s], min(e.latency_samples, e.n),
                                                   e.latency_repeats)
        cmp = compare_sets(self.reference.images, out.images)
        row = {"config": config, "nfc": cm.nfc, "fid_to_fp": cmp["fid_to_fp"], "psnr": cmp["psnr"],
               "ssim": cmp["ssim"], **quality_metrics(out), "latency_s": latency,
               "latency_ratio": fp_latency / latency, "fp_latency_s": fp_latency, "size_ratio": self.fp_bytes / size,
               "size_bytes": size,
               "schedule": list(cm.schedule.full_steps) if cm.schedule is not None else None,
               "vc": cm.vc_factors is not None, "sample_s": round(took, 2)}
        self.rows.append(row)
        log("  ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in KEYS))

    def run(self, tmp: str) -> list[dict]:
        self.tmp = tmp
        e = self.recipe.eval
        self.fp_sampler = Sampler(self.fp, self.sched, self.recipe.sampling)
        t0 = time.perf_counter()
        self.reference = self.fp_sampler.sample(e.n, progress=False)
        log(f"FP reference: {e.n} images in {time.perf_counter() - t0:.1f}s")
        plain = CompressedModel(self.fp, self.sched, self.recipe.sampling, CacheConfig())
        self.measure("fp", plain, self.fp_bytes)

        naive_sel, _ = self.pool(None, "random")
        naive_q, naive_bytes = self.quantized(naive_sel)
        self.measure("ptq", self.compressed(naive_q, None, vc=False), naive_bytes)

        # a copy: the cache attaches to its transformer, and the FP sampler timed beside it must stay uncached
        rfc_fp = self.compressed(copy.deepcopy(self.fp), self.recipe.cache, vc=False)
        self.measure("rfc", rfc_fp, self.fp_bytes)
        fp_tau = rfc_fp.schedule.params.get("tau")

        self.measure("naive", self.compressed(naive_q, self.fora, vc=False), naive_bytes)

        fora_sel, _ = self.pool(self.fora, "tap")
        tap_q, tap_bytes = self.quantized(fora_sel)
        self.measure("+tap", self.compressed(tap_q, self.fora, vc=False), tap_bytes)
        self.measure("+tap+vc", self.compressed(tap_q, self.fora, vc=True), tap_bytes)

        self.measure("rfc_instead_of_fora", self.compressed(naive_q, self.recipe.cache, vc=False, tau_guess=fp_tau),
                     naive_bytes)

        rfc_sel, pool_tau = self.pool(self.recipe.cache, "tap")
        q, q_bytes = self.quantized(rfc_sel)
        self.measure("qcache", self.compressed(q, self.recipe.cache, vc=True, tau_guess=pool_tau), q_bytes)
        return self.rows


def table(rows: list[dict]) -> str:
    head = "| config | NFC | FID-to-FP | FID (data) | class acc. | PSNR (dB) | latency ratio | size ratio |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['nfc']} | {r['fid_to_fp']:.3f} | {r['fid_data']:.2f} | "
                     f"{r['class_accuracy']:.3f} | {r['psnr']:.2f} | {r['latency_ratio']:.2f} | "
                     f"{r['size_ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    import tempfile

    import datasets

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "recipes" / "digits.yaml"))
    ap.add_argument("--n", type=int, default=500, help="images per row (same noise as the FP reference)")
    ap.add_argument("--nfc", type=int, default=14, help="target NFC of the cached rows")
    ap.add_argument("--latency-samples", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--table-from", default=None, help="only print the table of a saved result JSON")
    args = ap.parse_args()
    if args.table_from:
        print(table(json.loads(Path(args.table_from).read_text())["rows"]))
        return
    datasets.disable_progress_bars()
    torch.set_grad_enabled(False)
    bench = Ablation(args)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench.run(tmp)
    result = {"recipe": args.recipe, "n": args.n, "nfc": args.nfc, "latency_samples": args.latency_samples,
              "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
              "recipe_sections": {k: dataclasses.asdict(getattr(bench.recipe, k))
                                  for k in ("sampling", "cache", "calibration", "quant", "vc")}}
    if args.json:
        write_json(args.json, result)
    print(table(rows))


if __name__ == "__main__":
    run_cli(main)
