"""What the cache's own arithmetic costs per step, module by module, against the memory it has to read.

    python tools/module_costs.py --model digits --json docs/results/module_costs_digits.json
    python tools/module_costs.py --model mid --dtype bfloat16 --json docs/results/module_costs_mid_bf16.json

``tools/step_costs.py`` times whole model calls; this isolates the cache's part of them. It builds, for every
cacheable module of the model (DiT: attn1 and ff of each block), the state each policy keeps, with random values of
the real shapes (``--batch`` images, so 2 x batch rows with CFG; ``digits``: the embedded model, fp32; ``mid``:
tools/bench_speed.py's DiT-S/2 at 256x256), and times one step's worth of calls (every module once, so that each
state is read back from memory as in a sampling run, not from cache) of the compiled functions the lean path runs
(``qcache/cache/fused.py``, ``cache.compile: true``):

- ``fora``: h + gate * O(t);  ``taylor``: the order-2 forecast, gated and added;
- ``rfe``: RFE's cached module (builds the module input from h, its distance to I(t), the scaled forecast);
- ``rfe_input``: only the first half of that (LayerNorm + modulation of h and ||I - I(t)||);
- ``rfe_update``: RFE's full-step update (new differences, their Gram matrix, ||I(t) - I(t-N)||);
- ``stream``: a plain sum over the same stored tensors that ``rfe`` reads (O, two differences, I(t)): the memory
  floor of reading RFE's state once.

Each row has the median milliseconds per step (all modules), the bytes of the activation-sized tensors it reads
besides the hidden state h (the stored state; the update also reads the new output and input) and the rate that
gives. Medians of ``--repeats`` timed loops, after compiling outside them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from qcache.cli import run_cli, write_json  # noqa: E402
from qcache.compiling import compile_fn  # noqa: E402
from qcache.cache import fused  # noqa: E402
from qcache.errors import QcacheError  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def model_shape(name: str) -> tuple[int, int, int]:
    """(tokens, width, cacheable modules) of a model, from its diffusers config."""
    if name == "digits":
        from qcache.models import load_model
        from qcache.recipe import ModelConfig

        cfg = load_model(ModelConfig(source="builtin:digits", device="cpu")).transformer.config
    else:
        from bench_speed import COMMON, MID

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
    for fn, _ in fns.values():
        fn(), fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, (fn, _) in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    rows = []
    for k, (_, nbytes) in fns.items():
        ms = statistics.median(times[k]) * 1e3
        rows.append({"name": k, "ms_per_step": ms, "bytes_read": nbytes, "gb_per_s": nbytes / ms / 1e6})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("digits", "mid"), default="digits")
    ap.add_argument("--batch", type=int, default=None, help="images (CFG doubles the rows); digits 100, mid 8")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="the model's and the state's dtype")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
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


if __name__ == "__main__":
    run_cli(main)
