"""The speed backend: torchao dynamic int8 (or float8) quantization, a compute-dtype cast, regional torch.compile.

Where quanto is the calibrated, portable compression backend, this one is meant to be fast where it runs:

- ``W8A8``: ``Int8DynamicActivationInt8WeightConfig`` (int8 weights per channel, activations quantized per token at
  run time, so no calibration set); ``W8``: ``Int8WeightOnlyConfig``. With ``float8: true`` the same presets use
  ``Float8DynamicActivationFloat8WeightConfig`` / ``Float8WeightOnlyConfig`` (e4m3, per row; CUDA, sm >= 8.9).
- The module plan is quanto's (``plan_quantization``): attention/MLP linears get the preset, the conditioning
  (embedders, adaLN) weight-only, the patch embedding and final projection stay in floating point.
- ``compute_dtype`` casts the model first (bfloat16 on GPUs; on CPUs without bf16 units it is slower, see
  docs/speed.md); unquantized tensors are rounded to ``keep_dtype`` like quanto's, so the checkpoint is small and
  reloads bit-identically.
- ``compile`` compiles each block's ``norm1``, ``attn1``/``attn2`` and ``ff`` (regional compilation: identical
  blocks share one graph, and the feature cache, which wraps ``attn*``/``ff`` from outside, keeps working).

torchao is an optional dependency (``pip install 'qcache[speed]'``), imported only when this backend is used.
"""

from __future__ import annotations

import torch

from ..compiling import compile_fn
from ..errors import QcacheError
from ..recipe import QuantConfig
from .kernels import use_exact_cpu_int_mm
from .plan import DTYPES, plan_quantization, round_kept_tensors

FORMAT = "qcache-torchao/1"
COMPILED_REGIONS = ("norm1", "attn1", "attn2", "ff")
FLOAT8_MIN_CAPABILITY = (8, 9)


def require_torchao():
    """The torchao module, or a one-line error saying how to install it."""
    try:
        import torchao
    except ImportError:
        raise QcacheError("quant.backend: torchao is not installed (pip install 'qcache[speed]' or torchao)") from None
    return torchao


def ao_config(weights: str, activations: str, float8: bool):
    """The torchao config object for one plan entry (weights int8, activations int8 | none)."""
    require_torchao()
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    if weights != "int8":
        raise QcacheError(f"quant.backend: torchao has no {weights} weights here (int8 and float8 only)")
    if float8:
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if activations != "none" \
            else Float8WeightOnlyConfig()
    return Int8DynamicActivationInt8WeightConfig() if activations != "none" else Int8WeightOnlyConfig()


def check_float8_device(device: torch.device) -> None:
    """float8 GEMMs need a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper)."""
    if device.type != "cuda":
        raise QcacheError(f"quant.float8: float8 needs a CUDA GPU (compute capability >= 8.9), the model is on "
                          f"{device}")
    cap = torch.cuda.get_device_capability(device)
    if cap < FLOAT8_MIN_CAPABILITY:
        raise QcacheError(f"quant.float8: float8 needs compute capability >= 8.9, {torch.cuda.get_device_name(device)} "
                          f"has {cap[0]}.{cap[1]}")


def apply_ao_plan(model: torch.nn.Module, plan: dict[str, dict], float8: bool) -> None:
    """Quantize the planned modules with torchao's ``quantize_``, one call per distinct config."""
    from torchao.quantization import quantize_

    for name in plan:
        if not isinstance(model.get_submodule(name), torch.nn.Linear):
            raise QcacheError(f"quant.backend: torchao quantizes nn.Linear only, {name!r} is "
                              f"{type(model.get_submodule(name)).__name__} (exclude it)")
    groups: dict[tuple[str, str], set[str]] = {}
    for name, spec in plan.items():
        groups.setdefault((spec["weights"], spec["activations"]), set()).add(name)
    for (w, a), names in sorted(groups.items()):
        quantize_(model, ao_config(w, a, float8), filter_fn=lambda m, fqn, names=names: fqn in names)


def compile_regions(model: torch.nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every block's norm1 / attn1 / attn2 / ff forward in place; returns how many were compiled.

    The compiled function becomes the module's instance ``forward``, so hooks attached later (the feature cache)
    wrap it and call it on full steps. Idempotent: already compiled modules are skipped. ``backend`` is
    torch.compile's (``eager`` traces without code generation: what the tests use).
    """
    n = 0
    for block in getattr(model, "transformer_blocks", []):
        for region in COMPILED_REGIONS:
            module = getattr(block, region, None)
            if module is None or getattr(module, "_qcache_compiled", False):
                continue
            module.forward = compile_fn(module.forward, backend=backend)
            module._qcache_compiled = True
            n += 1
    return n


def target_dtype(model: torch.nn.Module, compute_dtype: str) -> torch.dtype:
    return next(model.parameters()).dtype if compute_dtype == "model" else DTYPES[compute_dtype]


def quantize_torchao(transformer: torch.nn.Module, cfg: QuantConfig) -> torch.nn.Module:
    """Quantize ``transformer`` in place with the torchao backend; returns it with ``qcache_quant`` filled in."""
    require_torchao()
    device = next(transformer.parameters()).device
    plan = plan_quantization(transformer, cfg)
    if cfg.float8 and plan:
        check_float8_device(device)
    dtype = target_dtype(transformer, cfg.compute_dtype)
    torch.nn.Module.to(transformer, dtype)  # (diffusers' own .to() warns about dtype casts)
    transformer.eval().requires_grad_(False)
    round_kept_tensors(transformer, plan, cfg.keep_dtype)
    apply_ao_plan(transformer, plan, cfg.float8)
    use_exact_cpu_int_mm(transformer.requires_grad_(False))
    transformer.qcache_quant = {
        "format": FORMAT,
        "backend": "torchao",
        "preset": cfg.preset,
        "float8": cfg.float8,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "compile": cfg.compile,
        "keep_dtype": cfg.keep_dtype,
        "calibration_rows": 0,
        "modules": {n: {**s, "quantize_output": False} for n, s in plan.items()},
    }
    if cfg.compile:
        compile_regions(transformer)
    return transformer
