"""A cached step's per-module arithmetic as pure tensor functions, for ``torch.compile`` (``cache.compile: true``).

In eager mode, a cached step of one module is about ten kernels over an activation-sized tensor (LayerNorm,
modulation, RFE's input distance, the forecast, the gate, the residual), each with its own launch and output;
compiled, they fuse into two or three loops. That pays where a cached step is launch-bound (GPUs); on this
project's CPUs the eager lean path already runs near memory bandwidth and gains little (docs/cache.md). The
functions take every step-dependent number as a tensor (forecast weights, per-sample scales), so one compiled graph
serves every step; a new shape (batch size, number of differences) compiles once more. Results equal the eager path
up to float rounding (reductions are reordered).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..compiling import compile_fn
from .forecast import rfe_coefficients


def _norm_mod(h: torch.Tensor, ln_w: torch.Tensor | None, ln_b: torch.Tensor | None, eps: float,
              scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
    """The module's input: ``LayerNorm(h) * (1 + scale) + shift`` (no modulation where scale is None)."""
    x = F.layer_norm(h, (h.shape[-1],), ln_w, ln_b, eps)
    return x if scale is None else x * (1 + scale) + shift


def _rfe_coef(inp: torch.Tensor, last: torch.Tensor, w: torch.Tensor, gram: torch.Tensor,
              s: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficients (B, 1, j) of the differences in RFE's forecast."""
    b = inp.shape[0]
    moved = _sample_dist(inp, last)
    return (rfe_coefficients(moved, w, gram, s)[:, None] * w).view(b, 1, -1)


def _sample_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample ||a - b|| in float32 (RFE's input distances, cached and full steps alike), summed row by row over
    the last dimension first: the compiled loop then runs over the same (rows, width) grid as the LayerNorm that
    builds ``a``, where one flat reduction per sample made inductor index every element through a division and a
    modulo (2x slower on CPU)."""
    d = a.float() - b.float()
    if d.dim() > 2:
        d = d.reshape(d.shape[0], -1, d.shape[-1])
        return (d * d).sum(-1).sum(-1).sqrt()
    return torch.linalg.vector_norm(d, dim=1)


def _forecast(value: torch.Tensor, coef: torch.Tensor, diffs: torch.Tensor) -> torch.Tensor:
    """``value + coef @ diffs`` per sample in float32, shaped like ``value``; coef (B, 1, j), diffs (B, j, n).

    Written as j multiply-adds rather than a matmul: the compiler fuses them with the gate and the residual into
    one loop over the stored tensors, where a matmul stays a separate library call with its own output."""
    b = value.shape[0]
    c = coef.to(torch.float32).reshape(b, -1, 1)
    pred = value.reshape(b, -1).float()
    for i in range(diffs.shape[1]):
        pred = pred + c[:, i] * diffs[:, i].float()
    return pred.view(value.shape)


def _gated(h: torch.Tensor, gate: torch.Tensor | None, pred: torch.Tensor) -> torch.Tensor:
    pred = pred.to(h.dtype)
    return (pred if gate is None else gate * pred) + h


def reuse_step(h: torch.Tensor, gate: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """``h + gate * O(t)``: FORA, or any forecast before its first difference."""
    return _gated(h, gate, value)


def taylor_step(h: torch.Tensor, gate: torch.Tensor | None, value: torch.Tensor, diffs: torch.Tensor,
                w: torch.Tensor) -> torch.Tensor:
    """``h + gate * (O(t) + sum_i w_i D_i)``: the plain forecast with shared weights ``w`` (j,)."""
    return _gated(h, gate, _forecast(value, w.expand(value.shape[0], 1, -1), diffs))


def rfe_step(h: torch.Tensor, gate: torch.Tensor | None, inp: torch.Tensor, value: torch.Tensor,
             diffs: torch.Tensor, w: torch.Tensor, last: torch.Tensor, gram: torch.Tensor,
             s: torch.Tensor) -> torch.Tensor:
    """RFE's forecast of a module whose input ``inp`` is given, gated and added to ``h``."""
    return _gated(h, gate, _forecast(value, _rfe_coef(inp, last, w, gram, s), diffs))


def rfe_norm_step(h: torch.Tensor, gate: torch.Tensor | None, ln_w: torch.Tensor | None, ln_b: torch.Tensor | None,
                  eps: float, scale: torch.Tensor | None, shift: torch.Tensor | None, value: torch.Tensor,
                  diffs: torch.Tensor, w: torch.Tensor, last: torch.Tensor, gram: torch.Tensor,
                  s: torch.Tensor) -> torch.Tensor:
    """``rfe_step`` for a module whose input is ``LayerNorm(h)`` (modulated): the input is never materialised."""
    return rfe_step(h, gate, _norm_mod(h, ln_w, ln_b, eps, scale, shift), value, diffs, w, last, gram, s)


def difference_rows(cur: torch.Tensor, value: torch.Tensor, old: torch.Tensor | None,
                    spans: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A full step's new divided differences (B, j, n) from the new value ``cur`` (B, n), the last value and the last
    differences ``old`` (B, j_old, n): row i = (row i-1 - old row i-1) / spans[i] (see forecast.Forecaster.update),
    taken in float32 and stored in ``dtype``."""
    prev, rows = cur.float(), []
    for i in range(spans.shape[0]):
        base = value.float() if i == 0 else old[:, i - 1].float()
        prev = (prev - base) / spans[i].float()
        rows.append(prev)
    return torch.stack(rows, 1).to(dtype)


def rfe_observe(cur: torch.Tensor, value: torch.Tensor, old: torch.Tensor | None, spans: torch.Tensor,
                inp: torch.Tensor, last: torch.Tensor, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RFE's full-step update in one pass: the new differences (stored in ``dtype``), the per-sample Gram matrix
    (B, j, j) of those stored rows and ||I(t) - I(t-N)|| per sample (see forecast.RelationalEstimator.update)."""
    rows = difference_rows(cur, value, old, spans, dtype)
    r = rows.float()
    gram = (r.unsqueeze(2) * r.unsqueeze(1)).sum(-1)
    return rows, gram.double(), _sample_dist(inp, last).double()


BACKEND = "inductor"  # torch.compile backend; the tests use "eager" (graph capture without code generation)


@functools.lru_cache(maxsize=None)
def compiled(name: str):
    """The compiled version of one of this module's step functions (compiled once per process, one graph per input
    signature: precision, number of differences, eps, strides; see qcache.compiling)."""
    return compile_fn(globals()[name], backend=BACKEND)
