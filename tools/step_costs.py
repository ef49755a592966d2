"""Cost of one full and one cached model call per cache policy, eager and compiled: where a cached step's time goes.

    python tools/step_costs.py --model digits --json runs/step_costs_digits.json
    python tools/step_costs.py --model mid --batch 8 --steps 12 --json runs/step_costs_mid.json

Every model call of a sampling run is timed on its own (a sampler hook reads the clock before and after it) and
labelled full or cached by the cache's ``full_step`` flag; each row reports the median over those calls, pooled
over ``--repeats`` runs, as milliseconds and as a fraction of the uncached model's call (FP, timed in the same
rounds). Medians of single calls are far steadier on shared cores than differences of whole runs. The schedule has
full steps at 0, 1 and every ``--every``-th step after, so both forecast orders are met. ``digits`` is the
embedded model (batch of --batch images, CFG doubles it); ``mid`` is tools/bench_speed.py's random DiT-S/2 at
256x256. "module hooks" rows run the same policy without the lean cached-step path (``cache.fast_path: false``). ``predicted_ratio_nfc{N}`` = 50 FP calls / (N full + (50 - N) cached calls): the speed-up these costs
give at that NFC, before the sampler's own per-step work.
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
sys.path.insert(0, str(REPO / "tools"))

from qcache.cache import attach_cache  # noqa: E402
from qcache.cli import run_cli, write_json  # noqa: E402
from qcache.errors import QcacheError  # noqa: E402
from qcache.recipe import CacheConfig, SamplingConfig  # noqa: E402
from qcache.sampling import Sampler, SamplerHook  # noqa: E402

POLICIES = {"FORA": dict(policy="fora"), "TaylorSeer": dict(policy="taylorseer", order=2),
            "RFE": dict(policy="rfc", order=2, rcs=False)}


class CallTimer(SamplerHook):
    """Seconds of every model call, split by the cache's full_step flag (all full without a cache)."""

    def __init__(self) -> None:
        self.full: list[float] = []
        self.cached: list[float] = []
        self._t0 = 0.0

    def before_model(self, state) -> None:
        self._t0 = time.perf_counter()

    def after_model(self, state) -> None:
        dt = time.perf_counter() - self._t0
        (self.full if state.extras.get("full_step", True) else self.cached).append(dt)


def build(name: str, batch: int, steps: int, precision: str = "model", compile_model: bool = False) -> Sampler:
    """The sampler of one model; ``precision`` (fp32 | bf16 | int8) and ``compile_model`` rebuild it through the
    torchao speed backend, as tools/bench_speed.py's variants."""
    if name == "digits":
        from qcache.models import load_model
        from qcache.recipe import ModelConfig

        loaded = load_model(ModelConfig(source="builtin:digits", device="cpu"))
        model, sched = loaded.transformer, loaded.scheduler_config
    else:
        from bench_speed import MID, SCHEDULER, build_base

        model, sched = build_base(MID, 0, torch.device("cpu")), SCHEDULER
    if precision != "model" or compile_model:
        from qcache.quant import compile_regions, quantize_transformer
        from qcache.recipe import QuantConfig

        dtype = {"bf16": "bfloat16"}.get(precision, "float32")
        model = quantize_transformer(model, QuantConfig(backend="torchao", preset="W8A8" if precision == "int8"
                                                        else "none", compute_dtype=dtype, keep_dtype="float32"))
        if compile_model:
            compile_regions(model)
    return Sampler(model, sched, SamplingConfig(steps=steps, batch_size=batch, guidance_scale=1.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("digits", "mid"), default="digits")
    ap.add_argument("--batch", type=int, default=100, help="images per batch (CFG doubles the model batch)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--every", type=int, default=5, help="a full step every this many steps after the warm-up")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--compile", choices=("both", "on", "off"), default="both", help="cache.compile variants")
    ap.add_argument("--module-hooks", choices=("on", "off"), default="on",
                    help="also time each policy without the lean path (cache.fast_path: false)")
    ap.add_argument("--store-dtype", choices=("model", "float32", "bfloat16"), default="model",
                    help="cache.store_dtype of the forecast differences (model, the recipe default: bf16 for a bf16 "
                         "model, float32 otherwise)")
    ap.add_argument("--precision", choices=("model", "fp32", "bf16", "int8"), default="model",
                    help="the model's precision (int8: torchao W8A8 dynamic, float32 around it); model: as built")
    ap.add_argument("--compile-model", action="store_true",
                    help="regional torch.compile of the model (qcache.quant.compile_regions), as bench_speed's rows")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if args.steps < 4 or args.every < 2:
        raise QcacheError("--steps must be >= 4 and --every >= 2")
    sampler = build(args.model, args.batch, args.steps, args.precision, args.compile_model)
    full_steps = sorted({0, 1, *range(1 + args.every, args.steps, args.every)})
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    configs: list[tuple[str, CacheConfig | None]] = [("FP", None)]
    for name in args.policies.split(","):
        if name not in POLICIES:
            raise QcacheError(f"--policies: unknown policy {name!r} (choose from {', '.join(POLICIES)})")
        for comp in variants:
            configs.append((name + (" compiled" if comp else ""),
                            CacheConfig(**POLICIES[name], compile=comp, store_dtype=args.store_dtype)))
        if args.module_hooks == "on":
            configs.append((name + " module hooks",
                            CacheConfig(**POLICIES[name], fast_path=False, store_dtype=args.store_dtype)))
    timers = {label: CallTimer() for label, _ in configs}

    def run(label: str, cfg: CacheConfig | None, timer: CallTimer | None) -> None:
        cache = attach_cache(sampler.transformer, cfg, full_steps=full_steps) if cfg is not None else None
        hooks = [h for h in (cache, timer) if h is not None]
        try:
            with sampler.extra_hooks(*hooks):
                sampler.sample(args.batch, progress=False)
        finally:
            if cache is not None:
                cache.remove()

    for label, cfg in configs:  # warm-up (and compilation) outside the timed rounds
        run(label, cfg, None)
    for r in range(args.repeats):
        for label, cfg in configs:
            run(label, cfg, timers[label])
        print(f"round {r + 1}/{args.repeats} done", flush=True)

    fp = statistics.median(timers["FP"].full)
    rows = []
    for label, _ in configs:
        t = timers[label]
        full = statistics.median(t.full)
        cached = statistics.median(t.cached) if t.cached else None
        row = {"config": label, "full_ms": full * 1e3, "full_over_fp": full / fp,
               "cached_ms": None if cached is None else cached * 1e3,
               "cached_over_fp": None if cached is None else cached / fp,
               "calls": [len(t.full), len(t.cached)]}
        if cached is not None:
            for nfc in (14, 10, 8):
                row[f"predicted_ratio_nfc{nfc}"] = 50 * fp / (nfc * full + (50 - nfc) * cached)
        rows.append(row)
    print(f"| config | full call (ms) | / FP | cached call (ms) | / FP | ratio @ NFC 14 | @ 10 | @ 8 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        c = "–" if r["cached_ms"] is None else f"{r['cached_ms']:.2f} | {r['cached_over_fp']:.3f}"
        p = " | ".join(f"{r[f'predicted_ratio_nfc{n}']:.2f}" if f"predicted_ratio_nfc{n}" in r else "–"
                       for n in (14, 10, 8))
        print(f"| {r['config']} | {r['full_ms']:.1f} | {r['full_over_fp']:.3f} | "
              f"{c if r['cached_ms'] is not None else '– | –'} | {p} |")
    write_json(args.json, {"rows": rows, "model": args.model, "batch": args.batch, "steps": args.steps,
                           "full_steps": full_steps, "repeats": args.repeats, "store_dtype": args.store_dtype,
                           "precision": args.precision, "compile_model": args.compile_model,
                           "threads": torch.get_num_threads(), "torch": torch.__version__, "command": " ".join(sys.argv)})


if __name__ == "__main__":
    run_cli(main)
