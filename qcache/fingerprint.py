"""Fingerprints of what compress stages read besides the recipe: the model's files and its noise schedule.

A local model (``builtin:NAME`` or a directory) is fingerprinted by the sha256 of every file under its directory,
its ``scheduler/`` folder aside (the scheduler config is fingerprinted on its own, as loaded, so a stage that does not
sample - quantizing without calibration - is not recomputed when only the noise schedule changes). File hashes are
remembered by path, size, inode, mtime and ctime in a small JSON file (``$QCACHE_CACHE_DIR``, default
``~/.cache/qcache/file_hashes.json``), so a multi-gigabyte checkpoint is hashed once, not on every run. A hub model
is fingerprinted by the commit of its snapshot in the Hugging Face cache (snapshots are immutable).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

CACHE_ENV = "QCACHE_CACHE_DIR"
CACHE_FILE = "file_hashes.json"
# the folder whose content enters stage keys as the loaded scheduler config instead (see scheduler_fingerprint)
SCHEDULER_DIR = "scheduler"


def umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cache_dir() -> Path:
    """Where qcache keeps small caches: ``$QCACHE_CACHE_DIR``, else ``$XDG_CACHE_HOME/qcache``, else ~/.cache/qcache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qcache"


def file_sha256(path: Path) -> str:
    """The sha256 of a file's content, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class HashCache:
    """sha256 of files, remembered while a file's path, size, inode, mtime and ctime stay the same."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else cache_dir() / CACHE_FILE
        try:
            data = json.loads(self.path.read_text())
            self.entries: dict[str, dict] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    def sha256(self, path: Path) -> str:
        st = path.stat()
        stamp = [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
        key = str(path.resolve())
        hit = self.entries.get(key)
        if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
            return hit["sha256"]
        digest = file_sha256(path)
        self.entries[key] = {"stamp": stamp, "sha256": digest}
        self.dirty = True
        return digest

    def save(self) -> None:
        """Write the cache atomically; a cache that cannot be written is only a missed shortcut."""
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(self.entries, f)
                os.chmod(tmp, 0o666 & ~umask())  # mkstemp gives 0600
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            return
        self.dirty = False


def _files(root: Path) -> list[Path]:
    """Regular files under ``root`` (symlinks followed, each directory once), hidden names and the top-level
    scheduler folder left out, in a stable order."""
    out, seen = [], set()
    for d, dirs, names in os.walk(root, followlinks=True):
        st = os.stat(d)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        here = Path(d)
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and not (here == root and x == SCHEDULER_DIR))
        out += [here / n for n in sorted(names) if not n.startswith(".") and (here / n).is_file()]
    return out


def directory_fingerprint(root: str | Path, cache: HashCache | None = None) -> str:
    """sha256 over the relative path and content hash of every file of a model directory (scheduler/ aside)."""
    root = Path(root)
    own = cache is None
    cache = cache or HashCache()
    h = hashlib.sha256()
    for f in _files(root):
        h.update(f"{f.relative_to(root).as_posix()}\0{cache.sha256(f)}\n".encode())
    if own:
        cache.save()
    return h.hexdigest()


def hub_revision(repo_id: str) -> str | None:
    """The commit of ``repo_id``'s snapshot in the local Hugging Face cache (None when it cannot be told)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "transformer/config.json")
    except Exception:
        return None
    if not isinstance(found, (str, os.PathLike)):
        return None
    parts = Path(found).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def model_fingerprint(location: str, cache: HashCache | None = None) -> dict[str, Any]:
    """What identifies a model's weights and configs: the content of a local directory, or a hub revision."""
    path = Path(location)
    if path.is_dir():
        return {"files": directory_fingerprint(path, cache)}
    return {"hub": location, "revision": hub_revision(location)}


def scheduler_fingerprint(config: dict) -> str:
    """sha256 of a scheduler config as loaded (the model's own, or the default when it ships none)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def file_fingerprint(path: str | Path | None) -> str | None:
    """sha256 of a file a recipe names (e.g. ``cache.schedule``); None for no file."""
    return None if path is None else file_sha256(Path(path))
