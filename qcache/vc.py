"""Variance compensation (Q&C, DESIGN 4.4): rescale each intermediate sample's spread towards the FP trajectory.

Quantization plus caching inflates the per-channel variance of x_t while its mean barely moves. After every
scheduler step the sample is corrected per step t and channel c::

    x̃_t = μ_t + K_t ⊙ (x̂_t − μ_t)        μ_t: per-sample, per-channel spatial mean of x̂_t

K is fitted offline against the full-precision trajectory x′_t from the same noise, step by step in order while the
compressed trajectory is rolled forward with the factors fitted so far, so each K_t sees the trajectory it will
correct. Two readings of the fit (``vc.fit``, docs/vc.md): ``least_squares`` minimises ‖x′ − x̃‖² per channel
(K = cov(x′, x̂) / var(x̂)); ``variance`` matches the spread (K = std(x′) / std(x̂), Q&C's stated goal of
restoring the per-channel variance). K is clamped to a sane range.

``vc.enabled: auto`` validates the fitted factors on a held-out batch (other noise): VC is kept only where it
lowers the final-step error against the FP trajectory there (``fit_and_validate``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from .sampling import Sampler, SamplerHook, StepState

DEFAULT_CLAMP = (0.5, 1.5)


def compensate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Apply one step's factors ``k`` (C,) to ``x`` (B, C, H, W): μ + k ⊙ (x − μ) with μ the spatial mean.

    Written as x + (k − 1)(x − μ) so that k = 1 returns x bit for bit.
    """
    mu = x.mean(dim=(2, 3), keepdim=True)
    return x + (k.to(x).view(1, -1, 1, 1) - 1) * (x - mu)


def least_squares_factor(x_hat: torch.Tensor, x_ref: torch.Tensor) -> torch.Tensor:
    """Per-channel K minimising ‖x_ref − (μ + K(x̂ − μ))‖² over batch and positions; 1 where x̂ has no spread."""
    d = x_hat - x_hat.mean(dim=(2, 3), keepdim=True)
    num = (d * (x_ref - x_hat.mean(dim=(2, 3), keepdim=True))).sum(dim=(0, 2, 3))
    den = d.pow(2).sum(dim=(0, 2, 3))
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(num))


def variance_ratio_factor(x_hat: torch.Tensor, x_ref: torch.Tensor) -> torch.Tensor:
    """Per-channel K = std(x_ref − μ_ref) / std(x̂ − μ̂) over batch and positions (μ: per-sample spatial means), so
    that the corrected sample has the reference's per-channel spread; 1 where x̂ has no spread."""
    d = x_hat - x_hat.mean(dim=(2, 3), keepdim=True)
    r = x_ref - x_ref.mean(dim=(2, 3), keepdim=True)
    den = d.pow(2).sum(dim=(0, 2, 3))
    num = r.pow(2).sum(dim=(0, 2, 3))
    return torch.where(den > 0, (num / den.clamp_min(1e-30)).sqrt(), torch.ones_like(num))


FIT_METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "least_squares": least_squares_factor,
    "variance": variance_ratio_factor,
}


class VarianceCompensation(SamplerHook):
    """Sampler hook applying fitted factors ``(steps, C)`` after every scheduler step."""

    def __init__(self, factors: torch.Tensor) -> None:
        if factors.ndim != 2:
            raise ValueError(f"VC factors must be (steps, channels), got shape {tuple(factors.shape)}")
        self.factors = factors.float()

    def after_step(self, state: StepState) -> torch.Tensor | None:
        if state.num_steps != len(self.factors):
            raise ValueError(f"VC factors were fitted for {len(self.factors)} steps, the sampler runs "
                             f"{state.num_steps}")
        return compensate(state.latents, self.factors[state.index])


class _Record(SamplerHook):
    """Keeps x_t after every step of a reference run."""

    def __init__(self) -> None:
        self.trajectory: list[torch.Tensor] = []

    def after_step(self, state: StepState) -> None:
        self.trajectory.append(state.latents.clone())


class _Fit(SamplerHook):
    """Fits K_t at each step against the reference, then applies it so later steps see the corrected trajectory."""

    def __init__(self, reference: list[torch.Tensor], clamp: tuple[float, float],
                 method: str = "least_squares") -> None:
        self.reference = reference
        self.clamp = clamp
        self.factor = FIT_METHODS[method]
        self.factors: list[torch.Tensor] = []
        self.trajectory: list[torch.Tensor] = []  # the corrected x_t, as the fitted factors give it

    def after_step(self, state: StepState) -> torch.Tensor:
        k = self.factor(state.latents, self.reference[state.index].to(state.latents))
        k = k.clamp(*self.clamp)
        self.factors.append(k.cpu())
        out = compensate(state.latents, k)
        self.trajectory.append(out.clone())
        return out


def record_trajectory(sampler: Sampler, noise: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """x_t after every step of one ``sampler`` run from ``noise`` (its own hooks active)."""
    rec = _Record()
    with sampler.extra_hooks(rec):
        sampler.denoise(noise, labels, torch.Generator().manual_seed(seed))
    return rec.trajectory


def fit_vc_to_trajectory(compressed: Sampler, reference: list[torch.Tensor], noise: torch.Tensor,
                         labels: torch.Tensor, clamp: tuple[float, float] = DEFAULT_CLAMP,
                         seed: int = 0, method: str = "least_squares") -> torch.Tensor:
    """Fit K (steps, C) for ``compressed`` against a recorded reference trajectory from the same noise and labels;
    ``method``: a key of ``FIT_METHODS``."""
    return _fit(compressed, reference, noise, labels, clamp, seed, method)[0]


def _fit(compressed: Sampler, reference: list[torch.Tensor], noise: torch.Tensor, labels: torch.Tensor,
         clamp: tuple[float, float], seed: int, method: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    fit = _Fit(reference, clamp, method)
    with compressed.extra_hooks(fit):
        compressed.denoise(noise, labels, torch.Generator().manual_seed(seed))
    return torch.stack(fit.factors), fit.trajectory


def fit_vc(compressed: Sampler, reference: Sampler, noise: torch.Tensor, labels: torch.Tensor,
           clamp: tuple[float, float] = DEFAULT_CLAMP, seed: int = 0, method: str = "least_squares") -> torch.Tensor:
    """Fit K (steps, C) for ``compressed`` against ``reference`` on one batch from the same noise and labels.

    ``compressed`` keeps its own hooks (cache, ...); the fitting hook runs after them. Neither sampler is changed.
    """
    ref = record_trajectory(reference, noise, labels, seed)  # same DDPM noise for both runs
    return fit_vc_to_trajectory(compressed, ref, noise, labels, clamp, seed, method)


def trajectory_error(trajectory: list[torch.Tensor], reference: list[torch.Tensor]) -> list[float]:
    """Relative L2 error ‖x_t − x′_t‖ / ‖x′_t‖ per step, over the whole batch."""
    return [float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(trajectory, reference)]


@dataclass
class Batch:
    """One batch of a VC run: initial noise, condition ids and the DDPM noise seed."""

    noise: torch.Tensor
    labels: torch.Tensor
    seed: int


@dataclass
class VcResult:
    """What ``fit_and_validate`` decided: the factors to ship (None: no VC), per-step error curves, report info."""

    factors: torch.Tensor | None
    curves: dict[str, list[float]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def _with_factors(sampler: Sampler, factors: torch.Tensor, batch: Batch) -> list[torch.Tensor]:
    with sampler.extra_hooks(VarianceCompensation(factors)):
        return record_trajectory(sampler, batch.noise, batch.labels, batch.seed)


def fit_and_validate(compressed: Sampler | Callable[[], AbstractContextManager[Sampler]], reference: Sampler,
                     fit_batch: Batch, holdout: Batch | None, enabled: bool | str = "auto",
                     clamp: tuple[float, float] = DEFAULT_CLAMP, method: str = "least_squares",
                     min_gain: float = 0.0) -> VcResult:
    """Fit VC for ``compressed`` (its cache hooks active, no VC) on ``fit_batch`` and judge it on ``holdout``.

    ``compressed``: a sampler, or a callable opening one (``lambda: model.sampler(vc=False)``), entered only once
    the FP trajectories are recorded, so that a cache attached to a shared transformer cannot touch them.

    ``enabled``: False fits nothing; True always keeps the factors; ``"auto"`` keeps them only where they lower the
    final-step relative L2 error against ``reference``'s trajectory on the held-out batch (other noise) by more
    than the fraction ``min_gain`` (0: strictly lower).
    The held-out errors are measured whenever ``holdout`` is given (``auto`` needs it). ``info``: ``mode``,
    ``kept``, ``fit``, ``enabled`` (= kept), the fitting batch's final-step errors, the held-out ones, the factors'
    range. ``curves``: relative error per step, ``without_vc`` / ``with_vc`` on the fitting batch and
    ``heldout_without_vc`` / ``heldout_with_vc``.
    """
    mode = "auto" if enabled == "auto" else ("on" if enabled else "off")
    if mode == "auto" and holdout is None:
        raise ValueError("vc.enabled auto needs a held-out batch")
    ref = record_trajectory(reference, fit_batch.noise, fit_batch.labels, fit_batch.seed)
    href = None if holdout is None or mode == "off" else record_trajectory(reference, holdout.noise, holdout.labels,
                                                                           holdout.seed)
    opened = contextlib.nullcontext(compressed) if isinstance(compressed, Sampler) else compressed()
    with opened as s:
        res = _fit_and_validate(s, ref, href, fit_batch, holdout, mode, clamp, method)
    if mode == "auto":
        res.info["min_gain"] = min_gain
        keep = res.info["heldout_error_with"] < res.info["heldout_error_without"] * (1.0 - min_gain)
        res.info.update(kept=keep, enabled=keep)
        res.factors = res.factors if keep else None
    return res


def _fit_and_validate(compressed: Sampler, ref: list[torch.Tensor], href: list[torch.Tensor] | None,
                      fit_batch: Batch, holdout: Batch | None, mode: str, clamp: tuple[float, float],
                      method: str) -> VcResult:
    plain = record_trajectory(compressed, fit_batch.noise, fit_batch.labels, fit_batch.seed)
    curves = {"without_vc": trajectory_error(plain, ref)}
    info: dict = {"mode": mode, "fit": method, "final_error_without": curves["without_vc"][-1]}
    if mode == "off":
        info.update(kept=False, enabled=False)
        return VcResult(None, curves, info)
    factors, fitted = _fit(compressed, ref, fit_batch.noise, fit_batch.labels, clamp, fit_batch.seed, method)
    curves["with_vc"] = trajectory_error(fitted, ref)
    info.update(final_error_with=curves["with_vc"][-1], min=float(factors.min()), max=float(factors.max()),
                mean=float(factors.mean()))
    if holdout is not None and href is not None:
        curves["heldout_without_vc"] = trajectory_error(
            record_trajectory(compressed, holdout.noise, holdout.labels, holdout.seed), href)
        curves["heldout_with_vc"] = trajectory_error(_with_factors(compressed, factors, holdout), href)
        info.update(heldout_error_without=curves["heldout_without_vc"][-1],
                    heldout_error_with=curves["heldout_with_vc"][-1], heldout_samples=len(holdout.noise))
    info.update(kept=True, enabled=True)  # auto: decided by the caller against min_gain
    return VcResult(factors, curves, info)
