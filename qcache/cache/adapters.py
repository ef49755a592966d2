"""Model-specific knowledge of the cache, kept in one place: which modules are cacheable, which one is watched.

For diffusers' ``BasicTransformerBlock`` (DiT, PixArt) the cacheable modules are ``attn1``, ``attn2`` (where
present) and ``ff``. They are called with the normalised, adaLN-modulated hidden state as their first positional
argument, and their output is gated and added to the residual by the block afterwards, so caching them leaves the
gates and residuals running with fresh values. The first cacheable module of the first block is the one RCS watches:
its input depends only on (x_t, t, condition), so it is known before any expensive module runs.

Later adapters (SD3 joint blocks, FLUX double/single-stream blocks) add a branch to ``cache_layout``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import QcacheError


@dataclass(frozen=True)
class CacheLayout:
    """Names of the cacheable modules, in call order, and the one whose input drives the step decision."""

    names: tuple[str, ...]
    watched: str


def cache_layout(transformer: torch.nn.Module) -> CacheLayout:
    """The cacheable modules of ``transformer``; raises QcacheError for an architecture without an adapter."""
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None or len(blocks) == 0:
        raise QcacheError(f"cache: no adapter for {type(transformer).__name__} (no transformer_blocks)")
    names: list[str] = []
    for i, block in enumerate(blocks):
        if not all(hasattr(block, a) for a in ("attn1", "ff")):
            raise QcacheError(f"cache: no adapter for block type {type(block).__name__} of "
                              f"{type(transformer).__name__}")
        names.append(f"transformer_blocks.{i}.attn1")
        if getattr(block, "attn2", None) is not None:
            names.append(f"transformer_blocks.{i}.attn2")
        names.append(f"transformer_blocks.{i}.ff")
    return CacheLayout(tuple(names), names[0])


def module_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The tensor a cacheable module transforms: its first positional argument (or ``hidden_states``)."""
    return args[0] if args else kwargs["hidden_states"]
