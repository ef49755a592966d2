"""Image-set metrics: FID between feature sets, PSNR and SSIM between paired images, and ``compare_sets``.

Images are float tensors (N, C, H, W) in [-1, 1]. PSNR and SSIM compare image i of one set with image i of the
other, so both sets must come from the same noise and labels (compressed vs full precision, "FID-to-FP").
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0  # the PSNR reported for identical images (MSE = 0)


def fid_from_features(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D): ‖μa−μb‖² + Tr(Σa+Σb−2(ΣaΣb)^½)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least 2 samples in each set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr (Σa Σb)^½ = Tr (Σa^½ Σb Σa^½)^½, a symmetric PSD form that eigh handles stably even when singular
    sa = _psd_sqrt(cov_a)
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh(sa @ cov_b @ sa), 0, None)).sum())
    fid = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)
    return max(fid, 0.0)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean over images of 10·log10(range²/MSE); identical images count as ``PSNR_CAP_DB``."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    per = torch.where(mse > 0, 10 * torch.log10(data_range**2 / mse.clamp_min(1e-300)), torch.tensor(PSNR_CAP_DB,
                      dtype=torch.float64))
    return float(per.clamp(max=PSNR_CAP_DB).mean())


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window: int = 7, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) with a Gaussian window, valid positions only; window shrinks for tiny images."""
    _check_pair(a, b)
    a, b = a.double(), b.double()
    size = min(window, a.shape[-1], a.shape[-2])
    c = a.shape[1]
    w = _gaussian_window(size, sigma).expand(c, 1, size, size)
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    s_aa = F.conv2d(a * a, w, groups=c) - mu_a**2
    s_bb = F.conv2d(b * b, w, groups=c) - mu_b**2
    s_ab = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))
    return float(m.mean())


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"paired image sets must have equal (N, C, H, W) shapes, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


DIGITS_SHAPE = (1, 8, 8)


def default_features(images: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The feature network FID uses for these images: the digits classifier's feature layer for 1x8x8 images;
    None otherwise (Inception weights cannot be had here, so FID is not reported for other images)."""
    if tuple(images.shape[1:]) != DIGITS_SHAPE:
        return None
    from .classifier import classify

    return lambda x: classify(x)[1]


def compare_sets(reference: torch.Tensor, candidate: torch.Tensor,
                 features: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float | None]:
    """PSNR, SSIM and FID between two sample sets generated from the same noise (e.g. full precision vs compressed).

    Both sets are images in [-1, 1] (pixel space: latent models' samples decoded by their VAE). ``features`` maps
    images to (N, D) features; the default is ``default_features`` (digits classifier; ``fid_to_fp`` is None for
    images no feature network is available for).
    """
    features = features if features is not None else default_features(reference)
    ref, cand = reference.float().clamp(-1, 1), candidate.float().clamp(-1, 1)
    return {
        "psnr": psnr(ref, cand),
        "ssim": ssim(ref, cand),
        "fid_to_fp": None if features is None else fid_from_features(features(ref), features(cand)),
    }
