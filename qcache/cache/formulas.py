"""The cached-step formulas, once: pure tensor functions that every path of the cache calls.

- the module-hook path (``Forecaster`` / ``RelationalEstimator`` in forecast.py) calls them eagerly;
- the lean block path (fast_path.py) calls the composed steps (``reuse_step``, ``forecast_step``, ``rfe_step``)
  eagerly, with ``out`` buffers so a cached step allocates nothing;
- ``cache.compile: true`` calls the same functions through ``torch.compile`` (fused.py), without ``out``.

Every step-dependent number (forecast weights, divisors, per-sample scales) comes in as a tensor or a float, so one
compiled graph serves every step. Two reductions take a different order when traced by the compiler (the forecast's
sum over differences and the per-sample distance): the compiler then fuses them with the surrounding element-wise
work, where the eager order (one ``baddbmm``, one flat norm) is what the eager paths have always computed. Compiled
results therefore equal the eager ones up to float rounding; the eager paths (hooks and lean path) are bit-identical
to each other.

Formulas (TaylorSeer, arXiv 2503.06923; RFE of RFC, arXiv 2602.19506):

- divided differences: ``D_i(x) = (D_{i-1}(x) - D_{i-1}(x_{old})) / span_i`` (``difference_rows``);
- forecast: ``O(x) = O(x_0) + sum_i c_i D_i`` (``forecast``), c_i = w_i (plain) or s * w_i (RFE);
- RFE's magnitude: ``s = scale * ||I(x) - I(x_0)|| / ||sum_i w_i D_i||`` (``rfe_coefficients``), with the
  denominator read off the per-sample Gram matrix of the differences (``gram``);
- input distance: ``||a - b||_2`` per sample (``sample_dist``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hi(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors upcast to float32 for the arithmetic; float32/float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def flat(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, numel per sample)."""
    return x.reshape(x.shape[0], -1)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ---- distances -------------------------------------------------------------------------------------------------
def sample_norm(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Per-sample p-norm over every dimension but the first; shape (B,)."""
    return torch.linalg.vector_norm(flat(x), ord=p, dim=1)


def sample_dist(a: torch.Tensor, b: torch.Tensor, p: float = 2.0, scratch: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Per-sample ||a - b||_p in float32 (or float64), shape (B,): RFE's input distance and RCS's error.

    ``scratch`` (a's shape and dtype, float32/float64) receives a - b instead of a new tensor; it may be ``a``
    itself. Traced by the compiler, the 2-norm is summed row by row over the last dimension first, so the compiled
    loop runs over the same (rows, width) grid as the LayerNorm that builds ``a``; one flat reduction per sample
    made inductor index every element through a division and a modulo (2x slower on CPU).
    """
    if _compiling() and p == 2.0:
        d = a.float() - b.float()
        if d.dim() > 2:
            d = d.reshape(d.shape[0], -1, d.shape[-1])
            return (d * d).sum(-1).sum(-1).sqrt()
        return torch.linalg.vector_norm(d, dim=1)
    if scratch is not None:
        return sample_norm(torch.sub(a, b, out=scratch), p)
    return torch.linalg.vector_norm(flat(hi(a)) - flat(b), ord=p, dim=1)


def relative_l1(x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """RCS's per-sample error ||x - pred||_1 / ||x||_1, shape (B,)."""
    x = hi(x)
    return sample_dist(x, pred, 1) / sample_norm(x, 1).clamp_min(1e-12)


# ---- full steps: divided differences and their Gram matrix -------------------------------------------------------
def rows_dtype(value: torch.Tensor, store: torch.dtype) -> torch.dtype:
    """The dtype the differences of ``value``'s trajectory are kept in: ``store``, except that a float32 store keeps
    a float64 trajectory's differences in float64."""
    return value.dtype if store == torch.float32 and value.dtype == torch.float64 else store


def difference_rows(cur: torch.Tensor, value: torch.Tensor, old: torch.Tensor | None, spans,
                    dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """A full step's new divided differences (B, j, n), j = len(spans).

    ``cur`` (B, n) is the new value, ``value`` (B, n) the last one, ``old`` (B, j_old, n) the last differences;
    row i = (row i-1 - old row i-1) / spans[i] with row -1 = cur and old row -1 = value, taken in float32 (float64
    for a float64 trajectory) and stored in ``dtype``. ``out`` ((B, j, n), ``dtype``) receives the rows in place:
    in the arithmetic's dtype each row is computed directly into its slot (no temporaries, no stack copy).
    """
    prev = hi(cur)
    rows = []
    for i in range(len(spans)):
        base = hi(value) if i == 0 else hi(old[:, i - 1])
        if out is not None and out.dtype == prev.dtype:
            prev = torch.sub(prev, base, out=out[:, i]).div_(spans[i])
        else:  # a bf16 store: differences of differences are taken in float32 before rounding
            prev = (prev - base) / spans[i]
            if out is not None:
                out[:, i].copy_(prev)
        rows.append(prev)
    if out is not None:
        return out
    return torch.stack(rows, 1).to(rows_dtype(prev, dtype))


def gram(rows: torch.Tensor) -> torch.Tensor:
    """Per-sample Gram matrices (B, j, j) of stored difference rows (B, j, n), in float64."""
    r = hi(rows)
    return torch.bmm(r, r.transpose(1, 2)).double()


# ---- cached steps: the forecast ----------------------------------------------------------------------------------
def rfe_coefficients(moved: torch.Tensor, w: torch.Tensor, gram_flat: torch.Tensor,
                     scale: torch.Tensor) -> torch.Tensor:
    """RFE's per-sample factor on the forecast's correction term: ``s * ||I(t+k) - I(t)|| / ||dir||``, shape (B,).

    ``moved`` is ||I(t+k) - I(t)|| per sample, ``w`` the weights (j,) of the differences, ``gram_flat`` their
    flattened per-sample Gram matrices (B, j*j), ``scale`` s per sample. Samples with an undefined factor (NaN
    scale, zero direction) get 1: the plain forecast."""
    w = w.double()
    dir_norm = (gram_flat @ torch.outer(w, w).reshape(-1)).clamp_min(0).sqrt()
    c = scale * moved.double() / dir_norm
    return torch.where(torch.isfinite(c), c, torch.ones_like(c))


def forecast(value: torch.Tensor, w: torch.Tensor, diffs: torch.Tensor, scale: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """``value + sum_i scale * w_i * D_i`` per sample, in float32 (float64 for a float64 value), value's shape.

    ``w`` (j,) are the weights of the differences ``diffs`` (B, j, n); ``scale`` an optional per-sample (B,)
    factor (RFE); ``out`` (contiguous, value's shape and float dtype) receives the result. Eager: one ``baddbmm``;
    traced by the compiler: j multiply-adds, which it fuses with the gate and the residual into one loop.
    """
    v = hi(value)
    n = v.shape[0]
    w = w.to(v.dtype)
    coef = w.expand(n, 1, -1) if scale is None else scale.to(v.dtype).view(n, 1, 1) * w
    if _compiling():
        c = coef.reshape(n, -1, 1)
        pred = v.reshape(n, -1)
        for i in range(diffs.shape[1]):
            pred = pred + c[:, i] * diffs[:, i].to(v.dtype)
        return pred.view(v.shape)
    res = torch.baddbmm(v.reshape(n, 1, -1), coef, hi(diffs).to(v.dtype),
                        out=None if out is None else out.view(n, 1, -1))
    return res.view(v.shape)


def normalize(h: torch.Tensor, ln_w: torch.Tensor | None, ln_b: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``LayerNorm(h)`` over the last dimension. An affine-free LayerNorm goes through the affine kernel with weight
    1, bias 0 in eager mode (the same values, 2-3x faster on CPU)."""
    d = (h.shape[-1],)
    if ln_w is None and not _compiling():
        ln_w = torch.ones(d, dtype=h.dtype, device=h.device)
        ln_b = torch.zeros_like(ln_w)
    return F.layer_norm(h, d, ln_w, ln_b, eps)


def modulate(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """adaLN's ``x * (1 + scale) + shift`` (x itself without a scale); ``out`` receives it."""
    if scale is None:
        return x
    if out is None:
        return x * (1 + scale) + shift
    return torch.mul(x, 1 + scale, out=out).add_(shift)


def module_input(h: torch.Tensor, ln_w: torch.Tensor | None, ln_b: torch.Tensor | None, eps: float,
                 scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """A block's cacheable module input: ``LayerNorm(h) * (1 + scale) + shift`` (no modulation without a scale)."""
    return modulate(normalize(h, ln_w, ln_b, eps), scale, shift, out)


def gated_residual(h: torch.Tensor, gate: torch.Tensor | None, pred: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``h + gate * pred`` (``h + pred`` without a gate), in h's dtype; ``out`` (h's shape and dtype) receives it
    and may be ``pred`` itself."""
    if out is None:
        pred = pred.to(h.dtype)
        return (pred if gate is None else gate * pred) + h
    if gate is None:
        return torch.add(pred, h, out=out)
    return torch.mul(pred, gate, out=out).add_(h)


# ---- composed steps (the lean path and torch.compile) -------------------------------------------------------------
def reuse_step(h: torch.Tensor, gate: torch.Tensor | None, value: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``h + gate * O(t)``: FORA, or any forecast before its first difference."""
    return gated_residual(h, gate, value, out)


def forecast_step(h: torch.Tensor, gate: torch.Tensor | None, value: torch.Tensor, diffs: torch.Tensor,
                  w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``h + gate * (O(t) + sum_i w_i D_i)``: the plain (TaylorSeer) forecast with shared weights ``w`` (j,)."""
    return gated_residual(h, gate, forecast(value, w, diffs, out=out), out)


def rfe_step(h: torch.Tensor, gate: torch.Tensor | None, inp: torch.Tensor, value: torch.Tensor,
             diffs: torch.Tensor, w: torch.Tensor, last: torch.Tensor, gram_flat: torch.Tensor, s: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """RFE's forecast of a module whose input ``inp`` is given, gated and added to ``h``.

    With ``out``, I(t+k) - I(t) is taken in ``out`` (which may hold ``inp`` itself), then the forecast."""
    moved = sample_dist(inp, last, scratch=out)
    c = rfe_coefficients(moved, w, gram_flat, s)
    return gated_residual(h, gate, forecast(value, w, diffs, scale=c, out=out), out)


def rfe_norm_step(h: torch.Tensor, gate: torch.Tensor | None, ln_w: torch.Tensor | None, ln_b: torch.Tensor | None,
                  eps: float, scale: torch.Tensor | None, shift: torch.Tensor | None, value: torch.Tensor,
                  diffs: torch.Tensor, w: torch.Tensor, last: torch.Tensor, gram_flat: torch.Tensor,
                  s: torch.Tensor) -> torch.Tensor:
    """``rfe_step`` for a module whose input is ``LayerNorm(h)`` (modulated), for the compiler: the input is then
    never materialised."""
    return rfe_step(h, gate, module_input(h, ln_w, ln_b, eps, scale, shift), value, diffs, w, last, gram_flat, s)


def rfe_observe(cur: torch.Tensor, value: torch.Tensor, old: torch.Tensor | None, spans: torch.Tensor,
                inp: torch.Tensor, last: torch.Tensor, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RFE's full-step update in one call: the new differences (stored in ``dtype``), their per-sample Gram matrix
    (B, j, j) and ||I(t) - I(t-N)|| per sample (float64)."""
    rows = difference_rows(cur, value, old, spans, dtype)
    return rows, gram(rows), sample_dist(inp, last).double()
