"""Which module gets which quantization: presets, the full-precision defaults, and fnmatch overrides.

A plan maps module names to ``{"weights": "int8"|"int4", "activations": "int8"|"none"}``; modules absent from it
stay in floating point. Only ``nn.Linear`` and ``nn.Conv2d`` are candidates, so norms are never wrapped (quanto
would wrap affine-free LayerNorms whose ``None`` state-dict entries break safetensors).
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch

from ..errors import QcacheError
from ..families.dit import DiTFamily
from ..families.registry import family_for
from ..recipe import QuantConfig

# preset -> (weights, activations)
PRESETS: dict[str, tuple[str, str]] = {
    "W8A8": ("int8", "int8"),
    "W4A8": ("int4", "int8"),
    "W8": ("int8", "none"),
    "W4": ("int4", "none"),
    "none": ("none", "none"),
}
# The patterns are per model family (``qcache.families``: ``ModelFamily.quant``). Conditioning: timestep/label/text
# embedders and adaLN modulation linears (DiT: one per block; PixArt: one shared adaln_single + caption projection;
# SD3: time_text_embed, context_embedder, norm1/norm1_context linears; FLUX: the same plus the single blocks'
# norm.linear). Their activations are never quantized; their weights follow ``QuantConfig.conditioning_weights``.
# Keep: always full precision unless an override names them (patch embedding / FLUX's x_embedder, final
# projection, FLUX's norm_out.linear). The DiT family's lists, kept here under their old names:
CONDITIONING_PATTERNS: tuple[str, ...] = DiTFamily.quant.conditioning
KEEP_PATTERNS: tuple[str, ...] = DiTFamily.quant.keep
CANDIDATE_TYPES = (torch.nn.Linear, torch.nn.Conv2d)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch(name, p) for p in patterns)


def plan_quantization(model: torch.nn.Module, cfg: QuantConfig) -> dict[str, dict[str, str]]:
    """Resolve ``cfg`` against ``model``'s module names; unmatched override/exclude patterns are an error."""
    weights, acts = PRESETS[cfg.preset]
    patterns = family_for(model).quant
    cond_w = weights if cfg.conditioning_weights == "preset" else cfg.conditioning_weights
    names = [n for n, m in model.named_modules() if isinstance(m, CANDIDATE_TYPES)]
    for i, p in enumerate(cfg.exclude):
        if not any(fnmatch(n, p) for n in names):
            raise QcacheError(f"quant.exclude[{i}]: pattern {p!r} matches no Linear/Conv2d module of the model")
    for i, ov in enumerate(cfg.overrides):
        if not any(fnmatch(n, ov.pattern) for n in names):
            raise QcacheError(f"quant.overrides[{i}].pattern: {ov.pattern!r} matches no Linear/Conv2d module of "
                              f"the model (e.g. {names[len(names) // 2]!r})")
    plan = {}
    for name in names:
        w, a = weights, acts
        if _matches(name, patterns.conditioning):
            w, a = cond_w, "none"
        if _matches(name, patterns.keep) or _matches(name, cfg.exclude):
            w, a = "none", "none"
        for ov in cfg.overrides:  # the last matching override wins
            if fnmatch(name, ov.pattern):
                w, a = ov.weights, ov.activations
        if w != "none":
            plan[name] = {"weights": w, "activations": a}
    return plan


# dtypes a kept (not quantized) tensor may be stored in
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def round_kept_tensors(model: torch.nn.Module, plan: dict, keep_dtype: str) -> None:
    """Round every float parameter that will not be quantized to ``keep_dtype`` precision, in place.

    The model keeps computing in its own dtype; the values become exactly representable in ``keep_dtype``, so
    the checkpoint stores them in 16 bits and reloads them bit-identically. Quantized weights are skipped.
    """
    target = DTYPES[keep_dtype]
    quantized = {f"{n}.weight" for n in plan}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in quantized or not p.is_floating_point():
                continue
            if target.itemsize < p.dtype.itemsize:
                p.copy_(p.to(target).to(p.dtype))
