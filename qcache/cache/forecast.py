"""Forecasting a module's tensor at a cached step from its values at the last full steps.

``Forecaster`` keeps, for one tensor trajectory f (a module's output, or the watched module's input), the value at
the last full step and its differences over the last ``order`` gaps. Two expansions:

- ``newton`` (default): Newton divided differences f[x0..xi] and weights prod_{j<i}(x - xj). This is the Taylor
  forecast of TaylorSeer with derivative estimates that are exact for polynomials, so an order-m forecast reproduces a
  degree-m polynomial trajectory exactly, also with uneven gaps between full steps.
- ``taylor``: TaylorSeer's reference form, D_i = (D_{i-1}(t) - D_{i-1}(t-N)) / N with N the last gap, and weights
  k^i / i!. It is exact to first order only (the second-order term is damped).

``RelationalEstimator`` adds RFE on top: the forecast keeps the Taylor term's direction and takes its magnitude from
the change of the module's input, scaled by ||dO|| / ||dI|| of the last two full steps. All norms are per sample
(dim 0), so every image and each half of a CFG batch gets its own scale.
"""

from __future__ import annotations

import math

import torch


def sample_norm(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Per-sample p-norm over every dimension but the first; shape (B,)."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), ord=p, dim=1)


def _per_sample(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.reshape(-1, *([1] * (like.ndim - 1)))


class Forecaster:
    """Divided differences of one tensor trajectory over the full steps, and the polynomial forecast they give."""

    def __init__(self, order: int, expansion: str = "newton", store_dtype: torch.dtype = torch.float32) -> None:
        if expansion not in ("newton", "taylor"):
            raise ValueError(f"expansion must be newton or taylor, got {expansion!r}")
        self.order = order
        self.expansion = expansion
        self.store_dtype = store_dtype
        self.reset()

    def reset(self) -> None:
        self.nodes: list[float] = []  # step positions of the last full steps, newest first
        self.diffs: list[torch.Tensor] = []  # diffs[0]: value at nodes[0]; diffs[i]: i-th difference

    @property
    def available(self) -> int:
        """Order that the stored differences support now (it grows as full steps arrive)."""
        return len(self.diffs) - 1

    def update(self, x: float, value: torch.Tensor) -> None:
        """Record the true value at full step ``x`` (newer than every node so far)."""
        new = [value]
        prev = value.float() if value.dtype != torch.float32 else value
        for i in range(1, min(len(self.diffs), self.order) + 1):
            span = x - (self.nodes[0] if self.expansion == "taylor" else self.nodes[i - 1])
            d = (prev - self.diffs[i - 1].float()) / span
            new.append(d.to(self.store_dtype))
            prev = d
        self.diffs = new
        self.nodes = [float(x), *self.nodes][: self.order + 1]

    def weights(self, x: float) -> list[float]:
        """Weights of diffs[1:] in the forecast at position x."""
        out, w = [], 1.0
        for i in range(1, len(self.diffs)):
            if self.expansion == "newton":
                w *= x - self.nodes[i - 1]
                out.append(w)
            else:
                out.append((x - self.nodes[0]) ** i / math.factorial(i))
        return out

    def predict(self, x: float, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Forecast at x: diffs[0] + sum_i w_i * scale * diffs[i]; ``scale`` is an optional per-sample (B,) factor."""
        base = self.diffs[0]
        ws = self.weights(x)
        if not ws:
            return base
        out = None
        for w, d in zip(ws, self.diffs[1:]):
            src = base if out is None else out
            if scale is None:
                out = torch.add(src, d, alpha=w) if out is None else out.add_(d, alpha=w)
            else:
                c = _per_sample(scale * w, d)
                out = torch.addcmul(src, c, d) if out is None else out.addcmul_(c, d)
        return out

    def nbytes(self) -> int:
        return sum(d.numel() * d.element_size() for d in self.diffs)


class RelationalEstimator:
    """RFE for one module: forecast direction from the differences, magnitude from the change of the input.

    ``O(t+k) = O(t) + s * ||I(t+k) - I(t)|| * dir / ||dir||`` with ``s = ||O(t) - O(t-N)|| / ||I(t) - I(t-N)||`` and
    ``dir`` the forecaster's correction term. ||dir|| comes from a per-sample Gram matrix of the differences kept at
    the full step, so a cached step costs one pass over the input more than a plain forecast. Samples whose scale
    is undefined (zero input change, zero direction, fewer than two full steps) fall back to the plain forecast.
    """

    def __init__(self, forecaster: Forecaster) -> None:
        self.f = forecaster
        self.reset()

    def reset(self) -> None:
        self.f.reset()
        self.last_input: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None  # s per sample, NaN where undefined
        self.gram: torch.Tensor | None = None  # (B, j, j) float64 Gram matrix of diffs[1..j]

    def update(self, x: float, inp: torch.Tensor, out: torch.Tensor) -> None:
        """Record a full step: the module's input and output at step x."""
        if self.f.diffs and self.last_input is not None and self.last_input.shape == inp.shape:
            d_out = sample_norm(out.float() - self.f.diffs[0].float())
            d_in = sample_norm(inp.float() - self.last_input)
            self.scale = torch.where(d_in > 0, d_out / d_in, torch.full_like(d_in, float("nan")))
        self.last_input = inp.float() if inp.dtype != torch.float32 else inp
        self.f.update(x, out)
        ds = [d.reshape(d.shape[0], -1).float() for d in self.f.diffs[1:]]
        if ds and self.scale is not None:
            j = len(ds)
            g = torch.empty(ds[0].shape[0], j, j, dtype=torch.float64, device=ds[0].device)
            for a in range(j):
                for b in range(a, j):
                    g[:, a, b] = g[:, b, a] = torch.linalg.vecdot(ds[a], ds[b]).double()
            self.gram = g
        else:
            self.gram = None

    def predict(self, x: float, inp: torch.Tensor) -> torch.Tensor:
        """Forecast of the module's output at cached step x, given its real input there."""
        if self.gram is None or self.scale is None:
            return self.f.predict(x)
        w = torch.tensor(self.f.weights(x), dtype=torch.float64, device=self.gram.device)
        dir_norm = torch.einsum("i,bij,j->b", w, self.gram, w).clamp_min(0).sqrt()
        mag = self.scale.double() * sample_norm(inp.float() - self.last_input).double()
        c = mag / dir_norm
        c = torch.where(torch.isfinite(c) & (dir_norm > 0), c, torch.ones_like(c)).float()
        return self.f.predict(x, scale=c)

    def nbytes(self) -> int:
        n = self.f.nbytes()
        for t in (self.last_input, self.scale, self.gram):
            n += 0 if t is None else t.numel() * t.element_size()
        return n
