"""``ModelParts``: what surrounds a transformer when it generates: its family, its conditioner, its VAE decoder.

Pixel-space models (the embedded digits DiT) have no decoder and their samples are the images. Latent-space models
decode through the pipeline's ``AutoencoderKL``, loaded from the base model source on first use (``LazyVae``), so
loading an artifact stays cheap until images are asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import QcacheError
from .base import ModelFamily
from .conditions import Conditioner

DECODE_BATCH = 8


class LazyVae:
    """The ``vae`` of a diffusers pipeline source, loaded on first use."""

    def __init__(self, source: str, device: torch.device, dtype: torch.dtype) -> None:
        self.source, self.device, self.dtype = source, device, dtype
        self._vae: torch.nn.Module | None = None

    def get(self) -> torch.nn.Module:
        if self._vae is None:
            from diffusers import AutoencoderKL

            kw = dict(subfolder="vae", torch_dtype=self.dtype)
            try:
                if Path(self.source).is_dir():
                    vae = AutoencoderKL.from_pretrained(self.source, **kw)
                else:
                    try:
                        vae = AutoencoderKL.from_pretrained(self.source, local_files_only=True, **kw)
                    except Exception:
                        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
                            raise
                        vae = AutoencoderKL.from_pretrained(self.source, **kw)
            except Exception as e:
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise QcacheError(f"model.source: cannot load the VAE of {self.source}: {first}") from None
            self._vae = vae.to(self.device).eval().requires_grad_(False)
        return self._vae


@dataclass
class ModelParts:
    """A model's family, conditioner and decoder (None: pixel space, samples are images)."""

    family: ModelFamily
    conditioner: Conditioner
    vae: LazyVae | None = None

    @torch.no_grad()
    def to_pixels(self, samples: torch.Tensor, batch_size: int = DECODE_BATCH) -> torch.Tensor:
        """Images in [-1, 1] (float32, CPU) from final samples: decoded by the VAE, or the samples themselves."""
        if self.vae is None:
            return samples
        vae = self.vae.get()
        return torch.cat([self.family.decode(vae, chunk).cpu() for chunk in samples.split(batch_size)])


def default_parts(transformer: torch.nn.Module, conditioner: Conditioner | None = None) -> ModelParts:
    """Parts of a bare transformer: its family, the given (or default class) conditioner, no decoder."""
    from .registry import family_for

    fam = family_for(transformer)
    return ModelParts(fam, conditioner or fam.default_conditioner(transformer), None)
