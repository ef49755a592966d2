"""Model-specific knowledge of the cache: which modules are cacheable, which one is watched, how calls map to tensors.

The layouts live with the model families (``qcache.families``): ``BasicTransformerBlock`` models (DiT, PixArt)
cache ``attn1`` / ``attn2`` / ``ff``; SD3's ``JointTransformerBlock`` caches the joint ``attn`` (both streams as one
tensor), ``attn2`` (SD3.5), ``ff`` and ``ff_context``. This module is the cache's single entry point to them.
"""

from __future__ import annotations

import torch

from ..errors import QcacheError
from ..families.base import CacheLayout, ModuleIO

__all__ = ["CacheLayout", "ModuleIO", "cache_layout"]


def cache_layout(transformer: torch.nn.Module) -> CacheLayout:
    """The cacheable modules of ``transformer``; raises QcacheError for an architecture without an adapter."""
    from ..families.registry import _BY_CLASS

    fam = _BY_CLASS.get(type(transformer).__name__)
    if fam is None:
        raise QcacheError(f"cache: no adapter for {type(transformer).__name__} (supported: "
                          f"{', '.join(_BY_CLASS)})")
    return fam.cache_layout(transformer)
