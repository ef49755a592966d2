"""``torch.compile`` for functions qcache compiles for many input signatures, without dynamo's cap on them.

Dynamo keeps at most ``torch._dynamo.config.recompile_limit`` (8) graphs per code object and runs every further
signature eagerly, with one warning. qcache meets more than that honestly: the same block regions and cache step
functions run in two precisions, with one and two forecast differences, with the LayerNorm eps of norm1 and of
norm3, and on the first block's non-contiguous hidden state. Past the cap, the rows of a benchmark silently ran
half-eager (tools/bench_speed.py, 2026-12-01). ``compile_fn`` raises the cap to ``RECOMPILE_LIMIT`` only while its
own function runs, so other compiled code in the process keeps the user's setting.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

RECOMPILE_LIMIT = 64  # graphs per compiled function: every signature qcache meets, with room to spare


def compile_fn(fn: Callable, backend: str = "inductor") -> Callable:
    """``torch.compile(fn, dynamic=False, backend=backend)`` with up to ``RECOMPILE_LIMIT`` graphs of its own."""
    compiled = torch.compile(fn, dynamic=False, backend=backend)
    config = torch._dynamo.config

    @functools.wraps(fn)
    def run(*args, **kwargs):
        old = config.recompile_limit
        config.recompile_limit = max(old, RECOMPILE_LIMIT)
        try:
            return compiled(*args, **kwargs)
        finally:
            config.recompile_limit = old

    return run
