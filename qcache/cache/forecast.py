"""Forecasting a module's tensor at a cached step from its values at the last full steps.

``Forecaster`` keeps, for one tensor trajectory f (a module's output, or the watched module's input), the value at
the last full step and its differences over the last ``order`` gaps. Two expansions:

- ``newton`` (default): Newton divided differences f[x0..xi] and weights prod_{j<i}(x - xj). This is the Taylor
  forecast of TaylorSeer with derivative estimates that are exact for polynomials, so an order-m forecast reproduces a
  degree-m polynomial trajectory exactly, also with uneven gaps between full steps.
- ``taylor``: TaylorSeer's reference form, D_i = (D_{i-1}(t) - D_{i-1}(t-N)) / N with N the last gap, and weights
  k^i / i!. It is exact to first order only (the second-order term is damped).

The differences of a batch are kept stacked, (B, j, numel), so that a forecast is one fused ``baddbmm`` pass
(value + coefficients @ differences) whether the coefficients are shared or per sample. They are computed in float32
and stored in ``store_dtype``; None stores them in bfloat16 for a bfloat16 trajectory (whose values carry no more
precision than that) and in float32 for every other.

``RelationalEstimator`` adds RFE on top: the forecast keeps the Taylor term's direction and takes its magnitude from
the change of the module's input, scaled by ||dO|| / ||dI|| of the last two full steps. All norms are per sample
(dim 0), so every image and each half of a CFG batch gets its own scale.
"""

from __future__ import annotations

import math

import torch


def _hi(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors upcast to float32 for the arithmetic; float32/float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def sample_norm(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Per-sample p-norm over every dimension but the first; shape (B,)."""
    return torch.linalg.vector_norm(_flat(x), ord=p, dim=1)


def sample_dist(a: torch.Tensor, b: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Per-sample ||a - b||_p; shape (B,). (Difference then norm: 2x faster on CPU than ``torch.cdist``.)"""
    return torch.linalg.vector_norm(_flat(a) - _flat(b), ord=p, dim=1)


def rfe_coefficients(moved: torch.Tensor, w: torch.Tensor, gram: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """RFE's per-sample factor on the forecast's correction term: ``s * ||I(t+k) - I(t)|| / ||dir||``.

    ``moved`` is ||I(t+k) - I(t)|| per sample, ``w`` the weights (j,) of the differences, ``gram`` their flattened
    per-sample Gram matrices (B, j*j), ``scale`` s per sample. Samples with an undefined factor (NaN scale, zero
    direction) get 1: the plain forecast. Shared by the eager path and the fused one (fused.py)."""
    dir_norm = (gram @ torch.outer(w, w).reshape(-1)).clamp_min(0).sqrt()
    c = scale * moved.double() / dir_norm
    return torch.where(torch.isfinite(c), c, torch.ones_like(c))


class Forecaster:
    """Divided differences of one tensor trajectory over the full steps, and the polynomial forecast they give."""

    def __init__(self, order: int, expansion: str = "newton", store_dtype: torch.dtype | None = torch.float32,
                 fused: bool = False) -> None:
        if expansion not in ("newton", "taylor"):
            raise ValueError(f"expansion must be newton or taylor, got {expansion!r}")
        self.order = order
        self.expansion = expansion
        self.store_dtype = store_dtype
        self.fused = fused  # full-step updates through torch.compile (cache.compile; fused.py)
        self.reset()

    def reset(self) -> None:
        self.nodes: list[float] = []  # step positions of the last full steps, newest first
        self.value: torch.Tensor | None = None  # the tensor at nodes[0], as the module returned it
        self.diffs: torch.Tensor | None = None  # (B, j, numel): 1st..j-th differences, j <= order

    @property
    def available(self) -> int:
        """Order that the stored differences support now (it grows as full steps arrive)."""
        return -1 if self.value is None else 0 if self.diffs is None else self.diffs.shape[1]

    def spans(self, x: float, j: int) -> list[float]:
        """Divisors of the 1st..j-th differences of a new value at x."""
        return [x - (self.nodes[0] if self.expansion == "taylor" else self.nodes[i]) for i in range(j)]

    def _next_order(self) -> int:
        return min(self.available + 1, self.order) if self.value is not None else 0

    def dtype_for(self, value: torch.Tensor) -> torch.dtype:
        """The dtype the differences of ``value``'s trajectory are stored in."""
        if self.store_dtype is not None:
            return self.store_dtype
        return torch.bfloat16 if value.dtype == torch.bfloat16 else torch.float32

    def _spans_tensor(self, x: float, j: int, device: torch.device) -> torch.Tensor:
        """``spans(x, j)`` as the float64 tensor the compiled updates take (fused.py)."""
        return torch.tensor(self.spans(x, j), dtype=torch.float64, device=device)

    def update(self, x: float, value: torch.Tensor) -> None:
        """Record the true value at full step ``x`` (newer than every node so far)."""
        j = self._next_order()
        if j > 0 and self.fused:
            from . import fused

            rows = fused.compiled("difference_rows")(_flat(value), _flat(self.value), self.diffs,
                                                     self._spans_tensor(x, j, value.device), self.dtype_for(value))
            self._store(x, value, rows)
            return
        rows = None
        if j > 0:
            cur = _flat(_hi(value))
            target = self.dtype_for(value)
            dtype = cur.dtype if target == torch.float32 else target
            # each row is written in place into the new buffer: no per-row temporaries, no stack copy
            rows = torch.empty((cur.shape[0], j, cur.shape[1]), dtype=dtype, device=cur.device)
            prev = cur
            for i, span in enumerate(self.spans(x, j)):
                old = _flat(_hi(self.value)) if i == 0 else _hi(self.diffs[:, i - 1])
                if dtype == cur.dtype:
                    torch.sub(prev, old, out=rows[:, i]).div_(span)
                    prev = rows[:, i]
                else:  # bf16 store: differences of differences are taken in float32 before rounding
                    prev = (prev - old) / span
                    rows[:, i].copy_(prev)
        self._store(x, value, rows)

    def _store(self, x: float, value: torch.Tensor, rows: torch.Tensor | None) -> None:
        target = self.dtype_for(value)
        if rows is not None and target != torch.float32:  # float32: as computed (float64 trajectories stay so)
            rows = rows.to(target)
        self.diffs = rows
        self.value = value
        self.nodes = [float(x), *self.nodes][: self.order + 1]

    def weights(self, x: float) -> list[float]:
        """Weights of the 1st..j-th differences in the forecast at position x."""
        out, w = [], 1.0
        for i in range(1, self.available + 1):
            if self.expansion == "newton":
                w *= x - self.nodes[i - 1]
                out.append(w)
            else:
                out.append((x - self.nodes[0]) ** i / math.factorial(i))
        return out

    def predict(self, x: float, scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Forecast at x: value + sum_i w_i * scale * diff_i; ``scale`` is an optional per-sample (B,) factor.

        ``out`` (contiguous, the value's shape and float dtype) receives the forecast instead of a new tensor;
        with no differences yet the stored value itself is returned, not copied."""
        if self.diffs is None:
            return self.value
        v = _hi(self.value)
        n = v.shape[0]
        w = torch.tensor(self.weights(x), dtype=v.dtype, device=v.device)
        coef = w.expand(n, 1, -1) if scale is None else scale.to(v.dtype).view(n, 1, 1) * w
        res = torch.baddbmm(v.reshape(n, 1, -1), coef, _hi(self.diffs).to(v.dtype),
                            out=None if out is None else out.view(n, 1, -1))
        return res.view(v.shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.value, self.diffs) if t is not None)


class RelationalEstimator:
    """RFE for one module: forecast direction from the differences, magnitude from the change of the input.

    ``O(t+k) = O(t) + s * ||I(t+k) - I(t)|| * dir / ||dir||`` with ``s = ||O(t) - O(t-N)|| / ||I(t) - I(t-N)||`` and
    ``dir`` the forecaster's correction term. ||dir|| comes from a per-sample Gram matrix of the differences kept at
    the full step, so a cached step costs one pass over the input (its distance to I(t)) more than a plain forecast. Samples whose
    scale is undefined (zero input change, zero direction, fewer than two full steps) fall back to the plain forecast.
    """

    def __init__(self, forecaster: Forecaster) -> None:
        self.f = forecaster
        self.reset()

    def reset(self) -> None:
        self.f.reset()
        self.last_input: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None  # s per sample (float64), NaN where undefined
        self.gram: torch.Tensor | None = None  # (B, j*j) float64 Gram matrices of the differences, flattened

    def update(self, x: float, inp: torch.Tensor, out: torch.Tensor) -> None:
        """Record a full step: the module's input and output at step x."""
        f = self.f
        moved = f.value is not None and self.last_input is not None and self.last_input.shape == inp.shape
        gap = x - f.nodes[0] if f.nodes else 0.0
        self.scale = self.gram = None
        if moved and f.order > 0 and f.fused:  # rows, Gram matrix and input distance in one compiled pass
            from . import fused

            spans = f._spans_tensor(x, f._next_order(), out.device)
            rows, gram, d_in = fused.compiled("rfe_observe")(_flat(out), _flat(f.value), f.diffs, spans, inp,
                                                             self.last_input, f.dtype_for(out))
            f._store(x, out, rows)
        else:
            d_in = sample_dist(_hi(inp), self.last_input).double() if moved and f.order > 0 else None
            f.update(x, out)
            d = f.diffs
            gram = None if d_in is None or d is None else torch.bmm(_hi(d), _hi(d).transpose(1, 2)).double()
        self.last_input = inp  # as the model computed it: distances to it are taken in float32
        if gram is None:
            return
        # ||O(t) - O(t-N)|| = N * ||first divided difference||: read off the Gram matrix, no extra pass
        d_out = gram[:, 0, 0].clamp_min(0).sqrt() * abs(gap)
        self.scale = torch.where(d_in > 0, d_out / d_in, torch.full_like(d_in, float("nan")))
        self.gram = gram.reshape(gram.shape[0], -1)  # (B, j*j), for one matmul per forecast

    def predict(self, x: float, inp: torch.Tensor, out: torch.Tensor | None = None,
                scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Forecast of the module's output at cached step x, given its real input there.

        ``out`` as in ``Forecaster.predict``; ``scratch`` (the input's shape, float) takes I(t+k) - I(t) instead of
        a new tensor, and may be ``inp`` itself when the caller no longer needs it."""
        if self.gram is None:
            return self.f.predict(x, out=out)
        w = torch.tensor(self.f.weights(x), dtype=torch.float64, device=self.gram.device)
        if scratch is None:
            moved = sample_dist(_hi(inp), self.last_input)
        else:
            moved = sample_norm(torch.sub(inp, self.last_input, out=scratch))
        return self.f.predict(x, scale=rfe_coefficients(moved, w, self.gram, self.scale), out=out)

    def nbytes(self) -> int:
        n = self.f.nbytes()
        for t in (self.last_input, self.scale, self.gram):
            n += 0 if t is None else t.numel() * t.element_size()
        return n
