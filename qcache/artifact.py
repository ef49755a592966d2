"""The artifact directory: atomic creation, ``manifest.json`` with a sha256 per file, verification on load.

An artifact is built in a temporary sibling directory and renamed into place only when complete, so a killed run
never leaves half an artifact. ``verify_artifact`` refuses a directory whose manifest is missing, of an unknown
format version, or whose files are missing or do not match their checksums, naming the file at fault.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from . import __version__
from .errors import QcacheError

FORMAT_NAME = "qcache-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(QcacheError):
    """An artifact that cannot be trusted or read; the message names the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _listing(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def write_manifest(root: Path, base_model: str, extra: dict | None = None) -> dict:
    """Write ``manifest.json`` listing the sha256 of every other file under ``root``."""
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "qcache_version": __version__,
        "base_model": base_model,
        "created_unix": int(time.time()),
        **(extra or {}),
        "files": _listing(root),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; on success rename it to ``final`` (replacing an old one).

    On any exception the temporary directory is removed and ``final`` is left as it was. The caller writes the
    manifest inside the block.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify_artifact(root: Path) -> dict:
    """Check format, version and every file's checksum; return the manifest."""
    root = Path(root)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"artifact: directory not found: {root}")
    if not mpath.is_file():
        raise ArtifactError(f"artifact: {mpath} is missing (not a qcache artifact, or an unfinished one)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"artifact: {mpath} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"artifact: {mpath}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"artifact: {mpath}: unknown format_version {manifest.get('format_version')!r} "
                            f"(this qcache {__version__} reads version {FORMAT_VERSION})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"artifact: {mpath}: no file list")
    for rel, digest in files.items():
        p = root / rel
        if not p.is_file():
            raise ArtifactError(f"artifact: file listed in the manifest is missing: {p}")
        if sha256_file(p) != digest:
            raise ArtifactError(f"artifact: checksum mismatch for {p} (the file was modified or is corrupt)")
    return manifest
