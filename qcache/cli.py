"""Shared plumbing of qcache's command-line entry points: one-line errors with exit code 2, atomic writes."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, NoReturn

from .errors import QcacheError

EXIT_USAGE = 2


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run ``main``; a QcacheError becomes ``error: <message>`` on stderr and exit code 2, with no traceback.

    The process's allocator keeps freed memory for reuse first (``qcache.memory.keep_freed_memory``)."""
    from .memory import keep_freed_memory

    keep_freed_memory()
    try:
        code = main() or 0
    except QcacheError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file through a temporary sibling and ``os.replace``, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (non-finite floats become null)."""
    atomic_write_bytes(path, (json.dumps(_json_safe(obj), indent=2) + "\n").encode())
