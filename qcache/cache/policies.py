"""Step policies: which denoising steps are full steps (the cacheable modules really run).

A policy answers once per step, when the watched module is called. Fixed policies know the answer from the step
index; ``RelationalSchedule`` (RCS) forecasts the watched module's input and makes a full step when the summed
relative L1 error of that forecast since the last full step exceeds tau.
"""

from __future__ import annotations

import torch

from .forecast import Forecaster, sample_dist, sample_norm


def interval_full_steps(steps: int, warmup: int, interval: int) -> list[int]:
    """Full steps of a fixed interval: the first ``warmup`` steps, then every ``interval`` steps after the last."""
    anchor = max(warmup, 1) - 1
    return [i for i in range(steps) if i <= anchor or (i - anchor) % interval == 0]


def uniform_full_steps(steps: int, warmup: int, nfc: int) -> list[int]:
    """Exactly ``nfc`` full steps: the warm-up, then the rest spread evenly over the remaining steps.

    Generalises ``interval_full_steps`` to an NFC that no integer interval gives (gaps differ by at most one).
    """
    warm = min(max(warmup, 1), steps)
    nfc = max(min(nfc, steps), warm)
    rest = nfc - warm
    anchor = warm - 1
    gap = (steps - anchor) / (rest + 1)
    extra = [anchor + int(j * gap + 0.5) for j in range(1, rest + 1)]
    return sorted(set(range(warm)) | set(extra))


class StepPolicy:
    """Base of step policies. ``needs_input``: whether ``decide`` uses the watched module's input."""

    needs_input = False

    def reset(self, num_steps: int | None) -> None:
        pass

    def decide(self, step: int, watched: torch.Tensor | None) -> bool:
        raise NotImplementedError

    def nbytes(self) -> int:
        return 0


class AllSteps(StepPolicy):
    """Every step is full (policy ``none``, and the reference for bit-identity)."""

    def decide(self, step: int, watched: torch.Tensor | None) -> bool:
        return True


class FixedSchedule(StepPolicy):
    """Full steps from a fixed list, or from (warmup, interval), or ``nfc`` evenly spread once the step count is known."""

    def __init__(self, warmup: int = 1, interval: int = 1, nfc: int | None = None,
                 full_steps: list[int] | None = None) -> None:
        self.warmup, self.interval, self.nfc = warmup, interval, nfc
        self.fixed = None if full_steps is None else frozenset(full_steps)
        self.full: frozenset[int] | None = self.fixed

    def reset(self, num_steps: int | None) -> None:
        if self.fixed is None and self.nfc is not None and num_steps is not None:
            self.full = frozenset(uniform_full_steps(num_steps, self.warmup, self.nfc))

    def decide(self, step: int, watched: torch.Tensor | None) -> bool:
        if self.full is not None:
            return step in self.full
        anchor = max(self.warmup, 1) - 1
        return step <= anchor or (step - anchor) % self.interval == 0


class RelationalSchedule(StepPolicy):
    """RCS: e(t+k) = ||I - I_T||_1 / ||I||_1 of the watched input's forecast; full step once sum(e) > tau.

    ``e`` is taken per sample and averaged over the batch, since the whole batch shares the step. tau = 0 makes
    every step full. ``errors`` keeps e of every step of the current generation (None on full steps), for analysis.
    """

    needs_input = True

    def __init__(self, tau: float, warmup: int, order: int, expansion: str = "newton",
                 store_dtype: torch.dtype = torch.float32) -> None:
        self.tau = tau
        self.warmup = warmup
        self.forecaster = Forecaster(order, expansion, store_dtype)
        self.reset(None)

    def reset(self, num_steps: int | None) -> None:
        self.forecaster.reset()
        self.acc = 0.0
        self.errors: list[float | None] = []

    def decide(self, step: int, watched: torch.Tensor | None) -> bool:
        full = step < self.warmup or self.forecaster.value is None or self.tau <= 0
        err = None
        if not full:
            x = watched if watched.dtype in (torch.float32, torch.float64) else watched.float()
            rel = sample_dist(x, self.forecaster.predict(step), 1) / sample_norm(x, 1).clamp_min(1e-12)
            err = float(rel.mean())
            self.acc += err
            full = self.acc > self.tau
        self.errors.append(err)
        if full:
            self.acc = 0.0
            self.forecaster.update(step, watched)
        return full

    def nbytes(self) -> int:
        return self.forecaster.nbytes()
