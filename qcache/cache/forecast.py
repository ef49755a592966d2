"""Forecasting a module's tensor at a cached step from its values at the last full steps, and each module's state.

``Forecaster`` keeps, for one tensor trajectory f (a module's output, or the watched module's input), the value at
the last full step and its differences over the last ``order`` gaps. Two expansions:

- ``newton`` (default): Newton divided differences f[x0..xi] and weights prod_{j<i}(x - xj). This is the Taylor
  forecast of TaylorSeer (arXiv 2503.06923) with derivative estimates that are exact for polynomials, so an
  order-m forecast reproduces a degree-m polynomial trajectory exactly, also with uneven gaps between full steps.
- ``taylor``: TaylorSeer's reference form, D_i = (D_{i-1}(t) - D_{i-1}(t-N)) / N with N the last gap, and weights
  k^i / i!. It is exact to first order only (the second-order term is damped).

The differences of a batch are kept stacked, (B, j, numel), so that a forecast is one fused pass (value +
coefficients @ differences) whether the coefficients are shared or per sample. They are computed in float32
and stored in ``store_dtype``; None stores them in bfloat16 for a bfloat16 trajectory (whose values carry no more
precision than that) and in float32 for every other.

``RelationalEstimator`` adds RFE (arXiv 2602.19506) on top: the forecast keeps the Taylor term's direction and takes
its magnitude from the change of the module's input, scaled by ||dO|| / ||dI|| of the last two full steps. All norms
are per sample (dim 0), so every image and each half of a CFG batch gets its own scale.

``ModuleState`` is what one cached unit remembers, by mode (``none``, ``reuse`` = FORA, ``forecast`` =
TaylorSeer's differences, ``rfe``), and the one place a cached step of that unit is computed. The arithmetic itself
is in formulas.py; its compiled versions (``cache.compile``) in fused.py.
"""

from __future__ import annotations

import math

import torch

from ..errors import QcacheError
from . import formulas as fm
from . import fused
from .formulas import sample_dist, sample_norm  # noqa: F401 - re-exported (older imports)

MODES = ("none", "reuse", "forecast", "rfe")


def rfe_coefficients(moved: torch.Tensor, w: torch.Tensor, gram: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """See ``formulas.rfe_coefficients`` (kept here for older imports)."""
    return fm.rfe_coefficients(moved, w, gram, scale)


def _compiled(fn):
    return fused.compiled(fn)


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

    def next_order(self) -> int:
        """How many differences a new full step gives."""
        return min(self.available + 1, self.order) if self.value is not None else 0

    def dtype_for(self, value: torch.Tensor) -> torch.dtype:
        """The dtype the differences of ``value``'s trajectory are stored in."""
        if self.store_dtype is not None:
            return self.store_dtype
        return torch.bfloat16 if value.dtype == torch.bfloat16 else torch.float32

    def new_rows(self, x: float, value: torch.Tensor) -> torch.Tensor | None:
        """The differences a new value at full step ``x`` gives (None before the second full step)."""
        j = self.next_order()
        if j == 0:
            return None
        target = self.dtype_for(value)
        if self.fused:  # one graph for every step: the divisors come in as a tensor
            spans = torch.tensor(self.spans(x, j), dtype=torch.float64, device=value.device)
            return _compiled(fm.difference_rows)(fm.flat(value), fm.flat(self.value), self.diffs, spans, target)
        cur = fm.flat(fm.hi(value))
        out = torch.empty((cur.shape[0], j, cur.shape[1]), dtype=fm.rows_dtype(cur, target), device=cur.device)
        return fm.difference_rows(cur, fm.flat(self.value), self.diffs, self.spans(x, j), target, out=out)

    def update(self, x: float, value: torch.Tensor) -> None:
        """Record the true value at full step ``x`` (newer than every node so far)."""
        self.store(x, value, self.new_rows(x, value))

    def store(self, x: float, value: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Keep ``value`` at step ``x`` and its new difference ``rows`` (from ``new_rows`` or ``rfe_observe``)."""
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

    def weight_tensor(self, x: float, device: torch.device | None = None) -> torch.Tensor:
        """``weights(x)`` as a float64 tensor (what the formulas take)."""
        return torch.tensor(self.weights(x), dtype=torch.float64, device=device or self.value.device)

    def predict(self, x: float, scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Forecast at x: value + sum_i w_i * scale * diff_i; ``scale`` is an optional per-sample (B,) factor.

        ``out`` (contiguous, the value's shape and float dtype) receives the forecast instead of a new tensor;
        with no differences yet the stored value itself is returned, not copied."""
        if self.diffs is None:
            return self.value
        return fm.forecast(self.value, self.weight_tensor(x), self.diffs, scale, out)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.value, self.diffs) if t is not None)


class RelationalEstimator:
    """RFE for one module: forecast direction from the differences, magnitude from the change of the input.

    ``O(t+k) = O(t) + s * ||I(t+k) - I(t)|| * dir / ||dir||`` with ``s = ||O(t) - O(t-N)|| / ||I(t) - I(t-N)||`` and
    ``dir`` the forecaster's correction term. ||dir|| comes from a per-sample Gram matrix of the differences kept at
    the full step, so a cached step costs one pass over the input (its distance to I(t)) more than a plain
    forecast. Samples whose scale is undefined (zero input change, zero direction, fewer than two full steps) fall
    back to the plain forecast.
    """

    def __init__(self, forecaster: Forecaster) -> None:
        self.f = forecaster
        self.reset()

    def reset(self) -> None:
        self.f.reset()
        self.last_input: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None  # s per sample (float64), NaN where undefined
        self.gram: torch.Tensor | None = None  # (B, j*j) float64 Gram matrices of the differences, flattened

    @property
    def ready(self) -> bool:
        """Whether RFE's magnitude is defined (two full steps seen); otherwise the plain forecast is used."""
        return self.gram is not None

    def update(self, x: float, inp: torch.Tensor, out: torch.Tensor) -> None:
        """Record a full step: the module's input and output at step x."""
        f = self.f
        moved = f.value is not None and self.last_input is not None and self.last_input.shape == inp.shape
        gap = x - f.nodes[0] if f.nodes else 0.0
        self.scale = self.gram = None
        if moved and f.order > 0 and f.fused:  # rows, Gram matrix and input distance in one compiled call
            spans = torch.tensor(f.spans(x, f.next_order()), dtype=torch.float64, device=out.device)
            rows, gram, d_in = _compiled(fm.rfe_observe)(fm.flat(out), fm.flat(f.value), f.diffs, spans, inp,
                                                         self.last_input, f.dtype_for(out))
            f.store(x, out, rows)
        else:
            d_in = fm.sample_dist(inp, self.last_input).double() if moved and f.order > 0 else None
            f.update(x, out)
            gram = None if d_in is None or f.diffs is None else fm.gram(f.diffs)
        self.last_input = inp  # as the model computed it: distances to it are taken in float32
        if gram is None:
            return
        # ||O(t) - O(t-N)|| = N * ||first divided difference||: read off the Gram matrix, no extra pass
        d_out = gram[:, 0, 0].clamp_min(0).sqrt() * abs(gap)
        self.scale = torch.where(d_in > 0, d_out / d_in, torch.full_like(d_in, float("nan")))
        self.gram = gram.reshape(gram.shape[0], -1)  # (B, j*j), for one matmul per forecast

    def coefficients(self, x: float, inp: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """RFE's per-sample factor (B,) at cached step x for the real input ``inp``; ``scratch`` as in
        ``formulas.sample_dist``."""
        moved = fm.sample_dist(inp, self.last_input, scratch=scratch)
        return fm.rfe_coefficients(moved, self.f.weight_tensor(x, self.gram.device), self.gram, self.scale)

    def predict(self, x: float, inp: torch.Tensor, out: torch.Tensor | None = None,
                scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Forecast of the module's output at cached step x, given its real input there.

        ``out`` as in ``Forecaster.predict``; ``scratch`` (the input's shape, float) takes I(t+k) - I(t) instead of
        a new tensor, and may be ``inp`` itself when the caller no longer needs it."""
        if not self.ready:
            return self.f.predict(x, out=out)
        return self.f.predict(x, scale=self.coefficients(x, inp, scratch), out=out)

    def nbytes(self) -> int:
        n = self.f.nbytes()
        for t in (self.last_input, self.scale, self.gram):
            n += 0 if t is None else t.numel() * t.element_size()
        return n


class ModuleState:
    """What one cached unit remembers, by ``mode``: nothing (none), its last output (reuse: FORA), its differences
    (forecast: TaylorSeer), or RFE's state (rfe); and the unit's cached step, computed from that state."""

    def __init__(self, mode: str, order: int, expansion: str, store_dtype: torch.dtype | None,
                 fused: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.forecaster = Forecaster(order if mode in ("forecast", "rfe") else 0, expansion, store_dtype, fused)
        self.rfe = RelationalEstimator(self.forecaster) if mode == "rfe" else None

    @property
    def reads_input(self) -> bool:
        """Whether a cached step needs the unit's real input (RFE's magnitude)."""
        return self.rfe is not None

    def reset(self) -> None:
        (self.rfe or self.forecaster).reset()

    def observe(self, step: int, inp: torch.Tensor, out: torch.Tensor) -> None:
        """A full step: the unit's input and output (the tensor that is forecast)."""
        if self.rfe is not None:
            self.rfe.update(step, inp, out)
        elif self.mode != "none":
            self.forecaster.update(step, out)

    def forecast(self, step: int, inp: torch.Tensor | None, out: torch.Tensor | None = None,
                 scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The unit's output at cached ``step``; ``out`` / ``scratch``: buffers to write into (see above)."""
        self.check_ready()
        if self.rfe is not None:
            return self.rfe.predict(step, inp, out=out, scratch=scratch)
        return self.forecaster.predict(step, out=out)

    def cached_step(self, step: int, h: torch.Tensor, gate: torch.Tensor | None, inp: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, compiled: bool = False,
                    norm: tuple | None = None) -> torch.Tensor:
        """``h + gate * forecast`` at cached ``step`` (``h + forecast`` without a gate): a block's residual update
        with the unit's output forecast.

        ``inp`` is the unit's real input (needed by RFE); ``out`` a buffer (h's shape and dtype) that receives the
        result and may hold ``inp``. ``compiled``: through the fused functions (fused.py); RFE then takes
        ``norm`` = (ln_w, ln_b, eps, scale, shift) to build the input inside the compiled graph when ``inp`` is
        None."""
        self.check_ready()
        f = self.forecaster
        call = _compiled if compiled else (lambda fn: fn)
        kw = {} if compiled else {"out": out}
        if f.diffs is None:
            return call(fm.reuse_step)(h, gate, f.value, **kw)
        w = f.weight_tensor(step, h.device)
        if self.rfe is None or not self.rfe.ready:
            return call(fm.forecast_step)(h, gate, f.value, f.diffs, w, **kw)
        rest = (f.value, f.diffs, w, self.rfe.last_input, self.rfe.gram, self.rfe.scale)
        if compiled and inp is None:
            return call(fm.rfe_norm_step)(h, gate, *norm, *rest)
        return call(fm.rfe_step)(h, gate, inp, *rest, **kw)

    def check_ready(self) -> None:
        """A forecast needs one full step first."""
        if self.forecaster.value is None:
            raise QcacheError("cache: a cached step came before any full step (warm-up must be >= 1)")

    def nbytes(self) -> int:
        return (self.rfe or self.forecaster).nbytes()
