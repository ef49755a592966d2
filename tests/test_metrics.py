"""Metric sanity: FID of a set with itself is ~0, real vs noise is large; PSNR and SSIM behave at their limits."""

from __future__ import annotations

import math

import pytest
import torch

from qcache.digits import load_split
from qcache.metrics import PSNR_CAP_DB, compare_sets, fid_from_features, psnr, ssim


def test_fid_identical_sets_is_zero_and_shift_is_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 8, generator=g)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    # a pure mean shift of 1 in every one of 8 dimensions costs exactly 8
    assert fid_from_features(a, a + 1.0) == pytest.approx(8.0, rel=1e-6)


def test_fid_real_vs_noise_is_large_and_real_vs_real_small():
    real, _ = load_split("test")
    train, _ = load_split("train")
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    r_vs_noise = compare_sets(real, noise)["fid_to_fp"]
    from qcache.classifier import classify

    r_vs_train = fid_from_features(classify(real)[1], classify(train)[1])
    assert r_vs_train < 0.05 * r_vs_noise
    assert r_vs_noise > 10 * max(r_vs_train, 1e-3)


def test_psnr_identical_is_capped_and_known_value():
    x = torch.zeros(3, 1, 8, 8)
    assert psnr(x, x) == PSNR_CAP_DB
    # MSE 0.01 with data range 2: 10*log10(4/0.01) = 26.0206
    assert psnr(x, x + 0.1) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-7)


def test_ssim_limits():
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-9)
    y = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert abs(ssim(x, y)) < 0.3  # independent noise images are structurally unrelated
    assert ssim(x, x * 0.5) < 0.95  # contrast loss is penalised
    assert ssim(x, x + 0.05 * torch.randn_like(x)) < 1.0


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="equal"):
        psnr(torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match="equal D"):
        fid_from_features(torch.zeros(5, 3), torch.zeros(5, 4))


def test_classifier_is_accurate_on_held_out_digits():
    from qcache.classifier import classify

    images, labels = load_split("test")
    preds, feats = classify(images)
    assert feats.shape == (len(images), 64)
    assert (preds == labels).float().mean() >= 0.97
