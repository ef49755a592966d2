"""qcache: post-training quantization + relational feature caching + variance compensation for diffusion
transformers."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import QcacheError  # noqa: E402


def load(path, device: str = "auto"):
    """Load a compressed artifact (or a ``qcache.compress`` output directory) as a ``CompressedModel``.

    The checksums of every file are verified first; ``.generate(n, seed=...)`` then samples with quantization,
    the cache schedule and variance compensation active (decoded by the base model's VAE for latent models), and
    ``.pipeline()`` gives the base model's diffusers pipeline around the compressed transformer.
    """
    from .artifact import load_artifact

    return load_artifact(path, device=device)


__all__ = ["QcacheError", "__version__", "load"]
