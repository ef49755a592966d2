"""Variance compensation: identity at K = 1, exact least squares, in-order fit against the reference."""

from __future__ import annotations

import pytest
import torch

from qcache.recipe import SamplingConfig
from qcache.sampling import Sampler
from qcache.vc import VarianceCompensation, compensate, fit_vc, least_squares_factor
from tests.conftest import SCHEDULER_CONFIG, tiny_dit


def test_unit_factors_are_the_identity_bit_for_bit():
    x = torch.randn(3, 4, 8, 8)
    assert torch.equal(compensate(x, torch.ones(4)), x)
    s = Sampler(tiny_dit(), SCHEDULER_CONFIG, SamplingConfig(steps=5, batch_size=4))
    plain = s.sample(4, progress=False).images
    s.hooks.append(VarianceCompensation(torch.ones(5, 1)))
    assert torch.equal(s.sample(4, progress=False).images, plain)


def test_compensation_keeps_the_mean_and_scales_the_spread():
    x = torch.randn(2, 3, 8, 8)
    k = torch.tensor([0.5, 1.0, 2.0])
    y = compensate(x, k)
    torch.testing.assert_close(y.mean((2, 3)), x.mean((2, 3)))
    torch.testing.assert_close(y.std((2, 3)), x.std((2, 3)) * k, rtol=1e-5, atol=1e-6)


def test_least_squares_recovers_known_factors():
    x_hat = torch.randn(5, 3, 8, 8)
    k_true = torch.tensor([0.8, 1.1, 1.3])
    x_ref = compensate(x_hat, k_true)
    torch.testing.assert_close(least_squares_factor(x_hat, x_ref), k_true, rtol=1e-5, atol=1e-6)
    flat = torch.ones(2, 3, 8, 8)  # no spread: K defaults to 1
    assert torch.equal(least_squares_factor(flat, flat * 2), torch.ones(3))


def test_fit_against_itself_is_one_and_against_a_scaled_model_corrects_it():
    cfg = SamplingConfig(steps=6, batch_size=8)
    ref = Sampler(tiny_dit(seed=0), SCHEDULER_CONFIG, cfg)
    noise, labels = torch.randn(8, 1, 8, 8), torch.arange(8)
    k = fit_vc(ref, ref, noise, labels)
    assert k.shape == (6, 1)
    torch.testing.assert_close(k, torch.ones(6, 1), rtol=1e-5, atol=1e-5)
    assert ref.hooks == []  # fitting leaves the samplers as they were
    other = Sampler(tiny_dit(seed=1), SCHEDULER_CONFIG, cfg)
    k2 = fit_vc(other, ref, noise, labels, clamp=(0.9, 1.1))
    assert ((k2 >= 0.9) & (k2 <= 1.1)).all() and not torch.allclose(k2, torch.ones_like(k2))
    # the fitted factors bring the other model's final samples closer to the reference
    base = other.denoise(noise, labels)
    other.hooks.append(VarianceCompensation(k2))
    fixed = other.denoise(noise, labels)
    target = ref.denoise(noise, labels)
    assert (fixed - target).pow(2).mean() < (base - target).pow(2).mean()


def test_wrong_step_count_is_refused():
    s = Sampler(tiny_dit(), SCHEDULER_CONFIG, SamplingConfig(steps=4, batch_size=2))
    s.hooks.append(VarianceCompensation(torch.ones(5, 1)))
    with pytest.raises(ValueError, match="fitted for 5 steps, the sampler runs 4"):
        s.sample(2, progress=False)
