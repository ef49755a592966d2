"""Cache layouts shared by families built on diffusers' ``BasicTransformerBlock`` (DiT, PixArt-α/Σ).

The cacheable modules of a ``BasicTransformerBlock`` are ``attn1``, ``attn2`` (where present) and ``ff``. They are
called with the normalised, adaLN-modulated hidden state as their first positional argument, and their output is
gated and added to the residual by the block afterwards, so caching them leaves the gates and residuals running
with fresh values. The first cacheable module of the first block is the one RCS watches: its input depends only on
(x_t, t, condition), so it is known before any expensive module runs.
"""

from __future__ import annotations

import torch

from ..errors import QcacheError
from .base import CacheLayout


def basic_block_layout(transformer: torch.nn.Module) -> CacheLayout:
    """``transformer_blocks.{i}.attn1`` / ``.attn2`` / ``.ff`` of every block, in call order."""
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
    return CacheLayout(tuple(names), names[0], blocks=tuple(f"transformer_blocks.{i}" for i in range(len(blocks))))
