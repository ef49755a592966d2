"""Variance compensation (Q&C, DESIGN 4.4): rescale each intermediate sample's spread towards the FP trajectory.

Quantization plus caching inflates the per-channel variance of x_t while its mean barely moves. After every
scheduler step the sample is corrected per step t and channel c::

    x̃_t = μ_t + K_t ⊙ (x̂_t − μ_t)        μ_t: per-sample, per-channel spatial mean of x̂_t

K is fitted offline by least squares against the full-precision trajectory x′_t from the same noise, step by step
in order while the compressed trajectory is rolled forward with the factors fitted so far, so each K_t sees the
trajectory it will correct. K is clamped to a sane range.
"""

from __future__ import annotations

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

    def __init__(self, reference: list[torch.Tensor], clamp: tuple[float, float]) -> None:
        self.reference = reference
        self.clamp = clamp
        self.factors: list[torch.Tensor] = []

    def after_step(self, state: StepState) -> torch.Tensor:
        k = least_squares_factor(state.latents, self.reference[state.index].to(state.latents))
        k = k.clamp(*self.clamp)
        self.factors.append(k.cpu())
        return compensate(state.latents, k)


def record_trajectory(sampler: Sampler, noise: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """x_t after every step of one ``sampler`` run from ``noise`` (its own hooks active)."""
    rec = _Record()
    with sampler.extra_hooks(rec):
        sampler.denoise(noise, labels, torch.Generator().manual_seed(seed))
    return rec.trajectory


def fit_vc_to_trajectory(compressed: Sampler, reference: list[torch.Tensor], noise: torch.Tensor,
                         labels: torch.Tensor, clamp: tuple[float, float] = DEFAULT_CLAMP,
                         seed: int = 0) -> torch.Tensor:
    """Fit K (steps, C) for ``compressed`` against a recorded reference trajectory from the same noise and labels."""
    fit = _Fit(reference, clamp)
    with compressed.extra_hooks(fit):
        compressed.denoise(noise, labels, torch.Generator().manual_seed(seed))
    return torch.stack(fit.factors)


def fit_vc(compressed: Sampler, reference: Sampler, noise: torch.Tensor, labels: torch.Tensor,
           clamp: tuple[float, float] = DEFAULT_CLAMP, seed: int = 0) -> torch.Tensor:
    """Fit K (steps, C) for ``compressed`` against ``reference`` on one batch from the same noise and labels.

    ``compressed`` keeps its own hooks (cache, ...); the fitting hook runs after them. Neither sampler is changed.
    """
    ref = record_trajectory(reference, noise, labels, seed)  # same DDPM noise for both runs
    return fit_vc_to_trajectory(compressed, ref, noise, labels, clamp, seed)


def trajectory_error(trajectory: list[torch.Tensor], reference: list[torch.Tensor]) -> list[float]:
    """Relative L2 error ‖x_t − x′_t‖ / ‖x′_t‖ per step, over the whole batch."""
    return [float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(trajectory, reference)]
