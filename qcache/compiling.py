"""``torch.compile`` for functions qcache compiles for many input signatures, without dynamo's cap on them.

Dynamo keeps at most ``torch._dynamo.config.recompile_limit`` (8) graphs per code object and runs every further
signature eagerly, with one warning. qcache meets more than that honestly: the same block regions and cache step
functions run in two precisions, with one and two forecast differences, with the LayerNorm eps of norm1 and of
norm3, and on the first block's non-contiguous hidden state; past the cap a benchmark's rows would silently run
half-eager. ``compile_fn`` raises the cap to ``RECOMPILE_LIMIT`` through ``torch._dynamo.config.patch`` only while
its own function runs, so other compiled code in the process keeps the user's setting.

Under a Python dispatch mode (``torch.utils.flop_counter.FlopCounterMode``, which qcache's FLOP accounting uses,
and debug modes) ``compile_fn`` runs the function eagerly: dynamo gives up on a frame it first meets under such a
mode and then runs it eagerly for the rest of the process, so one FLOP-counted sample would leave every later
"compiled" run eager (docs/speed.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

RECOMPILE_LIMIT = 64  # graphs per compiled function: every signature qcache meets, with room to spare


def _recompile_cap():
    """The one place qcache changes dynamo's configuration: a cap of at least ``RECOMPILE_LIMIT``, scoped."""
    return torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT))


def compile_fn(fn: Callable, backend: str = "inductor") -> Callable:
    """``torch.compile(fn, dynamic=False, backend=backend)`` with up to ``RECOMPILE_LIMIT`` graphs of its own, and
    eager under a dispatch mode (see above)."""
    compiled = torch.compile(fn, dynamic=False, backend=backend)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if is_in_torch_dispatch_mode():
            return fn(*args, **kwargs)
        with _recompile_cap():
            return compiled(*args, **kwargs)

    return run
