"""qcache: post-training quantization + relational feature caching + variance compensation for diffusion transformers."""

__version__ = "0.1.0"

from .errors import QcacheError  # noqa: E402

__all__ = ["QcacheError", "__version__"]
