"""Calibration pools and selections on disk: ``datasets.Dataset.save_to_disk`` into a temporary sibling, renamed."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from qcache.errors import QcacheError

COLUMNS = ("x", "timestep", "step_index", "num_steps", "class_label", "sample_id")  # class models
ID_COLUMNS = ("class_label", "prompt_index")  # the condition id: a class label, or an index into the prompt list


def save_dataset(ds, path: str | Path) -> Path:
    """Save ``ds`` at ``path`` atomically (a reader never sees half a dataset); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        ds.save_to_disk(str(tmp / "data"))
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp / "data", path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_dataset(path: str | Path, what: str = "calibration.pool_path"):
    """Load a saved pool or selection; a missing or unreadable one is a one-line QcacheError naming ``what``."""
    from datasets import load_from_disk

    path = Path(path)
    if not path.is_dir():
        raise QcacheError(f"{what}: no saved dataset at {path} (run python -m calibration.collect first?)")
    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise QcacheError(f"{what}: cannot load dataset at {path}: {str(e).splitlines()[0]}") from None
    missing = [c for c in ("x", "timestep") if c not in ds.column_names]
    if not any(c in ds.column_names for c in ID_COLUMNS):
        missing.append(" or ".join(ID_COLUMNS))
    if missing:
        raise QcacheError(f"{what}: dataset at {path} lacks columns {missing}")
    return ds
