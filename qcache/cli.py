"""Shared plumbing of qcache's command-line entry points: one-line errors with exit code 2, atomic writes.

Also the up-front checks every CLI runs before it does any work: output paths that can be written (named by the
flag or recipe key they came from), seeds in range, and strict JSON (no ``NaN``/``Infinity`` tokens) for every
file qcache writes.
"""

from __future__ import annotations

import errno
import json
import math
import os
import reprlib
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from .errors import QcacheError

EXIT_USAGE = 2
MAX_ERROR_CHARS = 1000  # an error line never grows beyond this (values inside it are shortened to ~200)
# Every seed qcache takes (recipe seeds, --seed flags). The sampler seeds DDPM's per-batch noise generator with
# seed * 1_000_003 + batch + 1, which must stay below 2**64 (torch.Generator.manual_seed's range).
MAX_SEED = 2**43 - 1
INT_LIMIT = 2**31 - 1  # counts and sizes given on a command line stay below this

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxtuple, _repr.maxdict = 3, 8, 8, 8
_repr.maxset, _repr.maxfrozenset, _repr.maxstring, _repr.maxother, _repr.maxlong = 8, 8, 160, 160, 60


def short(value: Any, limit: int = 200) -> str:
    """A repr of ``value`` of at most ``limit`` characters, built without expanding big or deep structures."""
    try:
        text = _repr.repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deeply>"
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def short_str(text: Any, limit: int = 200) -> str:
    """``str(text)`` on one line, cut to ``limit`` characters (paths and names inside error lines)."""
    text = str(text).replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(message: str) -> str:
    """``message`` on one line and at most MAX_ERROR_CHARS long."""
    text = " ".join(str(message).split("\n"))
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


def _os_error_line(e: OSError) -> str:
    where = e.filename if e.filename is not None else "file"
    return f"{short_str(os.fsdecode(where) if isinstance(where, bytes) else where)}: {e.strerror or e}"


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run ``main``; a QcacheError becomes ``error: <message>`` on stderr and exit code 2, with no traceback.

    OS errors on user-named paths, undecodable input and runaway nesting that slipped past the up-front checks are
    reported the same way (one line, exit 2). The process's allocator keeps freed memory for reuse first
    (``qcache.memory.keep_freed_memory``)."""
    from .memory import keep_freed_memory

    keep_freed_memory()
    try:
        code = main() or 0
    except QcacheError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except OSError as e:  # disk full, permissions changed under us, ...: the path and the reason
        print(f"error: {one_line(_os_error_line(e))}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except RecursionError:
        print("error: input nested too deeply", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


# ---- permissions -----------------------------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path, directory: bool | None = None) -> None:
    """Give ``path`` the mode the umask gives ordinary new files (0666) or directories (0777).

    ``tempfile.mkstemp``/``mkdtemp`` create 0600/0700 whatever the umask; files renamed into place from there
    would otherwise stay unreadable to the other users of a shared artifact.
    """
    p = Path(path)
    is_dir = p.is_dir() if directory is None else directory
    os.chmod(p, (0o777 if is_dir else 0o666) & ~current_umask())


def apply_umask_tree(root: str | Path) -> None:
    """``apply_umask`` on ``root`` and everything under it (symlinks are left alone)."""
    root = Path(root)
    mask = current_umask()
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            f = os.path.join(dirpath, name)
            if not os.path.islink(f):
                os.chmod(f, 0o666 & ~mask)


# ---- writing -----------------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file through a temporary sibling and ``os.replace``, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(v: Any) -> Any:
    """``v`` with every non-finite float replaced by None (strict JSON has no NaN/Infinity); tuples become lists."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


_json_safe = json_safe  # the older private name


def json_bytes(obj: Any, indent: int | None = 2, default: Callable[[Any], Any] | None = None) -> bytes:
    """Strict JSON of ``obj`` (non-finite floats become null) with a trailing newline, as UTF-8 bytes."""
    if default is not None:  # let ``default`` turn foreign objects into plain data first, then sanitise that
        obj = json.loads(json.dumps(obj, default=default, allow_nan=True))
    return (json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n").encode()


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented strict JSON (non-finite floats become null)."""
    atomic_write_bytes(path, json_bytes(obj))


# ---- up-front checks ---------------------------------------------------------------------------------------------
NAME_MAX = 255
PATH_MAX = 4096


def check_seed(value: Any, key: str) -> int:
    """``value`` if it is an integer seed in [0, MAX_SEED]; else a QcacheError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise QcacheError(f"{key}: must be an integer, got {short(value)}")
    if not 0 <= value <= MAX_SEED:
        raise QcacheError(f"{key}: must be in [0, {MAX_SEED}], got {short(value)}")
    return value


def check_device(device: str, key: str) -> str:
    """``device`` if it is auto, cpu, cuda or cuda:N; else a one-line QcacheError naming ``key``."""
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise QcacheError(f"{key}: must be auto, cpu, cuda or cuda:N, got {short(device)}")
    return device


def _first_existing(path: Path) -> tuple[Path, list[str]]:
    """The deepest existing ancestor of ``path`` (or the path itself) and the missing components below it."""
    missing: list[str] = []
    p = path
    while not os.path.lexists(p):
        missing.append(p.name)
        if p.parent == p:
            break
        p = p.parent
    return p, missing[::-1]


def _probe_dir(d: Path, key: str, shown: Path) -> None:
    """Create and remove a temporary file in ``d``: the only test that sees read-only mounts, /proc, immutable
    directories and permissions alike (``os.access`` is always true for root)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".qcache-probe.", dir=d)
    except OSError as e:
        raise QcacheError(f"{key}: cannot write under {short_str(d)} ({e.strerror or e}) for "
                          f"{short_str(shown)}") from None
    os.close(fd)
    os.unlink(tmp)


def check_output_path(path: str | Path, key: str, directory: bool = False) -> Path:
    """Check, without creating anything, that ``path`` can be written as a file (or a directory).

    The deepest existing ancestor must be a writable directory, every missing component a legal name, and an
    existing ``path`` of the right kind. Problems are one-line QcacheErrors naming ``key`` (``--json``,
    ``output.dir``, ...). Returns the path.
    """
    raw = str(path)
    if not raw or "\x00" in raw:
        raise QcacheError(f"{key}: not a valid path, got {short(raw)}")
    p = Path(raw).expanduser()
    if len(os.fsencode(str(p))) > PATH_MAX:
        raise QcacheError(f"{key}: path is longer than {PATH_MAX} bytes, got {short(raw)}")
    for part in p.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise QcacheError(f"{key}: a path component is longer than {NAME_MAX} bytes: {short(part)}")
    anchor, missing = _first_existing(p.absolute())
    if not missing:  # the path exists
        if directory and not p.is_dir():
            raise QcacheError(f"{key}: {short_str(raw)} exists and is not a directory")
        if not directory and p.is_dir():
            raise QcacheError(f"{key}: {short_str(raw)} is a directory, expected a file path")
        _probe_dir(p if directory else p.absolute().parent, key, p)
        return p
    if not anchor.is_dir():
        raise QcacheError(f"{key}: {short_str(anchor)} is not a directory, so {short_str(raw)} cannot "
                          f"be created")
    _probe_dir(anchor, key, p)
    return p


def os_error(e: OSError, key: str) -> QcacheError:
    """A one-line QcacheError for an OSError met while writing the path named by ``key``."""
    reason = e.strerror or errno.errorcode.get(e.errno or 0, str(e))
    return QcacheError(f"{key}: cannot write {short_str(e.filename or '')}: {reason}")
