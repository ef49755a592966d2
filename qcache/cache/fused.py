"""The cached-step formulas compiled with ``torch.compile`` (``cache.compile: true``).

In eager mode, a cached step of one module is about ten kernels over an activation-sized tensor (LayerNorm,
modulation, RFE's input distance, the forecast, the gate, the residual), each with its own launch and output;
compiled, they fuse into two or three loops. That pays where a cached step is launch-bound (GPUs); on CPUs the
eager lean path already runs near memory bandwidth and gains little (docs/cache.md). The functions compiled are
those of formulas.py, the same the eager paths call; compiled results equal the eager ones up to float rounding
(two reductions are reordered for the compiler, see formulas.py). One compiled graph serves every step; a new
shape (batch size, number of differences) compiles once more.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from ..compiling import compile_fn
from . import formulas

BACKEND = "inductor"  # torch.compile backend; the tests use "eager" (graph capture without code generation)

# the step functions by name (tools/module_costs.py and older callers name them; "taylor_step" is the old name of
# the plain forecast step)
STEPS: dict[str, Callable] = {
    "reuse_step": formulas.reuse_step,
    "forecast_step": formulas.forecast_step,
    "taylor_step": formulas.forecast_step,
    "rfe_step": formulas.rfe_step,
    "rfe_norm_step": formulas.rfe_norm_step,
    "difference_rows": formulas.difference_rows,
    "rfe_observe": formulas.rfe_observe,
}

# older names of formulas used by tools
_sample_dist = formulas.sample_dist
_norm_mod = formulas.module_input


@functools.cache
def compiled(step: str | Callable) -> Callable:
    """The compiled version of a step function of formulas.py (the function, or its name in ``STEPS``), compiled
    once per process with ``BACKEND`` (one graph per input signature: precision, number of differences, eps,
    strides; see qcache.compiling)."""
    fn = STEPS[step] if isinstance(step, str) else step
    return compile_fn(fn, backend=BACKEND)
