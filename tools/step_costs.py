"""What one step costs: each model call of a sampling run, full or cached, per cache policy; and (``--ops``) the
cache's own per-module arithmetic against the memory it has to read.

    python tools/step_costs.py --model digits --json runs/step_costs_digits.json
    python tools/step_costs.py --model mid --batch 8 --steps 12 --json runs/step_costs_mid.json
    python tools/step_costs.py --ops --model digits --json docs/results/module_costs_digits.json
    python tools/module_costs.py --model mid --dtype bfloat16 --json ...    # the same as --ops

**Model calls** (the default). Every model call of a sampling run is timed on its own (a sampler hook reads the
clock before and after it) and labelled full or cached by the cache's ``full_step`` flag; each row reports the
median over those calls, pooled over ``--repeats`` runs, as milliseconds and as a fraction of the uncached model's
call (FP, timed in the same rounds). Medians of single calls are far steadier on shared cores than differences of
whole runs. The schedule has full steps at 0, 1 and every ``--every``-th step after, so both forecast orders are
met. ``digits`` is the embedded model (batch of --batch images, CFG doubles it); ``mid`` is a random DiT-S/2 at
256x256 (``common.MID``). "module hooks" rows run the same policy without the lean cached-step path
(``cache.fast_path: false``). ``predicted_ratio_nfc{N}`` = 50 FP calls / (N full + (50 - N) cached calls): the
speed-up these costs give at that NFC, before the sampler's own per-step work.

**Cache arithmetic** (``--ops``). For every cacheable module of the model (DiT: attn1 and ff of each block) the state
each policy keeps is built with random values of the real shapes (``--batch`` images, so 2 x batch rows with CFG;
``--dtype`` the model's and the state's dtype), and one step's worth of calls (every module once, so that each
state is read back from memory as in a sampling run, not from cache) of the compiled functions the lean path runs
(``qcache/cache/fused.py``, ``cache.compile: true``) is timed:

- ``fora``: h + gate * O(t);  ``taylor``: the order-2 forecast, gated and added;
- ``rfe``: RFE's cached module (builds the module input from h, its distance to I(t), the scaled forecast);
- ``rfe_input``: only the first half of that (LayerNorm + modulation of h and ||I - I(t)||);
- ``rfe_update``: RFE's full-step update (new differences, their Gram matrix, ||I(t) - I(t-N)||);
- ``stream``: a plain sum over the same stored tensors that ``rfe`` reads (O, two differences, I(t)): the memory
  floor of reading RFE's state once.

Each row has the median milliseconds per step (all modules), the bytes of the activation-sized tensors it reads
besides the hidden state h (the stored state; the update also reads the new output and input) and the rate that
gives. Medians of ``--repeats`` interleaved rounds, after compiling outside them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from types import SimpleNamespace

import torch
from common import COMMON, MID, interleaved_times, named_model, run_cli, write_json

from qcache.cache import attach_cache, fused  # noqa: E402
from qcache.compiling import compile_fn  # noqa: E402
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
    model, sched = named_model(name)
    if precision != "model" or compile_model:
        from qcache.quant import compile_regions, quantize_transformer
        from qcache.recipe import QuantConfig

        dtype = {"bf16": "bfloat16"}.get(precision, "float32")
        model = quantize_transformer(model, QuantConfig(backend="torchao", preset="W8A8" if precision == "int8"
                                                        else "none", compute_dtype=dtype, keep_dtype="float32"))
        if compile_model:
            compile_regions(model)
    return Sampler(model, sched, SamplingConfig(steps=steps, batch_size=batch, guidance_scale=1.5))


def calls_main(argv: list[str] | None = None) -> None:
    """The model-call costs (the default mode)."""
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
    ap.add_argument("--granularity", default="module", metavar="LIST",
                    help="comma-separated cache.granularity values (module, block, span): every policy at each")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    grans = [g.strip() for g in args.granularity.split(",") if g.strip()]
    if args.steps < 4 or args.every < 2:
        raise QcacheError("--steps must be >= 4 and --every >= 2")
    sampler = build(args.model, args.batch, args.steps, args.precision, args.compile_model)
    full_steps = sorted({0, 1, *range(1 + args.every, args.steps, args.every)})
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    configs: list[tuple[str, CacheConfig | None]] = [("FP", None)]
    for name in args.policies.split(","):
        if name not in POLICIES:
            raise QcacheError(f"--policies: unknown policy {name!r} (choose from {', '.join(POLICIES)})")
        for gran in grans:
            label = name if gran == "module" else f"{name} {gran}"
            base = dict(**POLICIES[name], store_dtype=args.store_dtype, granularity=gran)
            for comp in variants:
                configs.append((label + (" compiled" if comp else ""), CacheConfig(**base, compile=comp)))
            if args.module_hooks == "on" and gran == "module":
                configs.append((label + " module hooks", CacheConfig(**base, fast_path=False)))
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
    print("| config | full call (ms) | / FP | cached call (ms) | / FP | ratio @ NFC 14 | @ 10 | @ 8 |")
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
                           "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "command": " ".join(sys.argv)})


# ---- the cache's own arithmetic (--ops) ---------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def model_shape(name: str) -> tuple[int, int, int]:
    """(tokens, width, cacheable modules) of a model, from its diffusers config."""
    if name == "digits":
        from qcache.models import load_model
        from qcache.recipe import ModelConfig

        cfg = load_model(ModelConfig(source="builtin:digits", device="cpu")).transformer.config
    else:
        cfg = SimpleNamespace(**MID, **COMMON)
    tokens = (cfg.sample_size // cfg.patch_size) ** 2
    return tokens, cfg.num_attention_heads * cfg.attention_head_dim, 2 * cfg.num_layers


def _stream(value: torch.Tensor, diffs: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    return value.float().sum() + diffs.float().sum() + last.float().sum()


def _rfe_input(h, ln_w, ln_b, eps, scale, shift, last):
    return fused._sample_dist(fused._norm_mod(h, ln_w, ln_b, eps, scale, shift), last)


class States:
    """Random per-module states of the given shapes: what RFE keeps (TaylorSeer and FORA keep part of it)."""

    def __init__(self, rows: int, tokens: int, width: int, modules: int, dtype: torch.dtype, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g).to(dtype)

        n = tokens * width
        self.h = rnd(rows, tokens, width)
        self.ones, self.zeros = torch.ones(width, dtype=dtype), torch.zeros(width, dtype=dtype)
        self.w = torch.tensor([2.0, 6.0], dtype=torch.float64)
        self.spans = torch.tensor([5.0, 10.0], dtype=torch.float64)
        self.mods = [dict(value=rnd(rows, tokens, width), diffs=rnd(rows, 2, n), last=rnd(rows, tokens, width),
                          new=rnd(rows, tokens, width), new_in=rnd(rows, tokens, width), old=rnd(rows, 1, n),
                          gram=torch.rand(rows, 4, generator=g, dtype=torch.float64) + 1,
                          s=torch.rand(rows, generator=g, dtype=torch.float64),
                          gate=rnd(rows, 1, width), scale=rnd(rows, 1, width), shift=rnd(rows, 1, width))
                     for _ in range(modules)]
        self.act_bytes = self.h.numel() * self.h.element_size()


def step_functions(st: States) -> dict[str, tuple[callable, int]]:
    """name -> (one step over every module, bytes of the activation-sized tensors it reads besides h)."""
    fora, taylor = fused.compiled("reuse_step"), fused.compiled("taylor_step")
    rfe, observe = fused.compiled("rfe_norm_step"), fused.compiled("rfe_observe")
    rfe_input, stream = compile_fn(_rfe_input, fused.BACKEND), compile_fn(_stream, fused.BACKEND)
    a, m = st.act_bytes, len(st.mods)
    dt = st.h.dtype

    def run_fora():
        x = st.h
        for s in st.mods:
            x = fora(x, s["gate"], s["value"])

    def run_taylor():
        x = st.h
        for s in st.mods:
            x = taylor(x, s["gate"], s["value"], s["diffs"], st.w)

    def run_rfe():
        x = st.h
        for s in st.mods:
            x = rfe(x, s["gate"], st.ones, st.zeros, 1e-6, s["scale"], s["shift"], s["value"], s["diffs"], st.w,
                    s["last"], s["gram"], s["s"])

    def run_rfe_input():
        for s in st.mods:
            rfe_input(st.h, st.ones, st.zeros, 1e-6, s["scale"], s["shift"], s["last"])

    def run_update():
        for s in st.mods:
            observe(s["new"].reshape(s["new"].shape[0], -1), s["value"].reshape(s["value"].shape[0], -1),
                    s["old"], st.spans, s["new_in"], s["last"], dt)

    def run_stream():
        for s in st.mods:
            stream(s["value"], s["diffs"], s["last"])

    return {"fora": (run_fora, m * a), "taylor": (run_taylor, 3 * m * a), "rfe": (run_rfe, 4 * m * a),
            "rfe_input": (run_rfe_input, m * a), "rfe_update": (run_update, 5 * m * a),
            "stream": (run_stream, 4 * m * a)}


def measure(fns: dict[str, tuple[callable, int]], repeats: int) -> list[dict]:
    """Median milliseconds per step of each function (interleaved rounds, compiled before them)."""
    calls = [fn for fn, _ in fns.values()]
    times = interleaved_times(calls, repeats, warmup=calls + calls)
    rows = []
    for (k, (_, nbytes)), ts in zip(fns.items(), times):
        ms = statistics.median(ts) * 1e3
        rows.append({"name": k, "ms_per_step": ms, "bytes_read": nbytes, "gb_per_s": nbytes / ms / 1e6})
    return rows


def ops_main(argv: list[str] | None = None) -> None:
    """The cache-arithmetic costs (``--ops``; ``tools/module_costs.py``)."""
    ap = argparse.ArgumentParser(description="What the cache's own arithmetic costs per step, module by module")
    ap.add_argument("--model", choices=("digits", "mid"), default="digits")
    ap.add_argument("--batch", type=int, default=None, help="images (CFG doubles the rows); digits 100, mid 8")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="the model's and the state's dtype")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    batch = args.batch if args.batch is not None else (100 if args.model == "digits" else 8)
    if batch < 1 or args.repeats < 1:
        raise QcacheError("--batch and --repeats must be >= 1")
    tokens, width, modules = model_shape(args.model)
    st = States(2 * batch, tokens, width, modules, DTYPES[args.dtype])
    rows = measure(step_functions(st), args.repeats)
    print(f"{args.model}: {2 * batch} rows x {tokens} tokens x {width}, {modules} modules, {args.dtype}; "
          f"one activation {st.act_bytes / 1e6:.2f} MB")
    print("| part | ms per step | read besides h (MB) | GB/s |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['ms_per_step']:.2f} | {r['bytes_read'] / 1e6:.1f} | "
              f"{r['gb_per_s']:.1f} |")
    write_json(args.json, {"rows": rows, "model": args.model, "batch": batch, "rows_per_call": 2 * batch,
                           "tokens": tokens, "width": width, "modules": modules, "dtype": args.dtype,
                           "activation_bytes": st.act_bytes, "repeats": args.repeats, "backend": fused.BACKEND,
                           "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "command": " ".join(sys.argv)})


def main(argv: list[str] | None = None) -> None:
    """``--ops``: the cache-arithmetic costs; otherwise the model-call costs."""
    argv = sys.argv[1:] if argv is None else argv
    if "--ops" in argv:
        return ops_main([a for a in argv if a != "--ops"])
    return calls_main(argv)


if __name__ == "__main__":
    run_cli(main)
