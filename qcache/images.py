"""Image grids: samples in [-1, 1] laid out in rows and written as PNG (Pillow, a diffusers dependency)."""

from __future__ import annotations

import io
import math

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """A (rows*H, nrow*W, C) uint8 grid of the images, ``pad`` pixels apart, each upscaled ``scale`` times."""
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"make_grid: need a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    arr = to_uint8(images)
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = arr[i]
    return grid


def png_bytes(grid: np.ndarray) -> bytes:
    """PNG encoding of a uint8 (H, W, C) grid (grey for one channel)."""
    from PIL import Image

    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
