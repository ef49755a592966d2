"""Resumable pipeline stages: each stage's product is a directory, built in a temporary sibling and renamed in.

A stage directory holds the product files and ``stage.json`` with the *key* it was built from (the recipe values
and upstream keys it depends on). On a re-run a stage whose directory exists with the same key is reused; one whose
key changed is rebuilt; a stage killed half-way left only a ``.partial`` directory, which is removed. So an
interrupted ``qcache.compress`` resumes at the stage it was in, and a changed recipe recomputes exactly the stages
that depend on what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import __version__

STAGE_FILE = "stage.json"


def stage_key(**parts: Any) -> str:
    """A short, stable hash of JSON-able ``parts`` (and the qcache version)."""
    blob = json.dumps({"qcache": __version__, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageResult:
    """Where a stage's product lies, the key it was built from, whether it was reused, and how long it took."""

    name: str
    path: Path
    key: str
    reused: bool
    seconds: float
    info: dict


class StageStore:
    """The ``stages/`` directory of one compress run."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def load(self, name: str, key: str) -> StageResult | None:
        """The finished stage ``name`` if it was built from ``key``; else None."""
        path = self.root / name
        try:
            meta = json.loads((path / STAGE_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if meta.get("key") != key:
            return None
        return StageResult(name, path, key, True, float(meta.get("seconds", 0.0)), dict(meta.get("info") or {}))

    def run(self, name: str, key: str, build: Callable[[Path], dict | None]) -> StageResult:
        """Reuse stage ``name`` if it was built from ``key``, else call ``build(tmpdir)`` and move it into place.

        ``build`` writes the product into the directory it is given and may return a small JSON-able ``info`` dict
        that is kept in ``stage.json`` (sizes, timings, summary lines).
        """
        done = self.load(name, key)
        if done is not None:
            return done
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f".{name}.*.partial"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=self.root))
        t0 = time.perf_counter()
        try:
            info = build(tmp) or {}
            seconds = time.perf_counter() - t0
            meta = {"name": name, "key": key, "seconds": round(seconds, 3), "info": info}
            (tmp / STAGE_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
            final = self.root / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return StageResult(name, final, key, False, seconds, info)
