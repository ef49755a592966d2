"""Where the models shipped with the package live, and the ``builtin:NAME`` sources that name them."""

from __future__ import annotations

from pathlib import Path

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_PREFIX = "builtin:"


def builtin_names() -> list[str]:
    """Names of the shipped diffusers model directories (those holding a ``transformer/`` folder)."""
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "transformer").is_dir())
