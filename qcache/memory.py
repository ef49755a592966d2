"""Process-wide allocator setting for qcache's command-line tools: keep freed memory instead of unmapping it.

PyTorch on CPU allocates every activation-sized tensor afresh. glibc serves large requests with ``mmap`` and hands
them back to the OS on ``free``, so the next tensor of that size is page-faulted in again, page by page; on the
shared VMs this project runs on that made a fresh activation-sized result many times slower than a reused one
(``python tools/bench_alloc.py [--keep-freed-memory]`` measures it), for the uncached and the cached model alike.
``keep_freed_memory`` raises glibc's mmap and trim thresholds,
the effect that jemalloc or tcmalloc give through ``LD_PRELOAD``. The CLI entry points call it at start
(``QCACHE_KEEP_FREED_MEMORY=0`` turns it off); as a library, qcache leaves the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum: requests above it are still mmap-ed
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed blocks (up to 32 MB each) for reuse; returns whether it took effect.

    A no-op off Linux/glibc, and when the environment variable ``QCACHE_KEEP_FREED_MEMORY`` is ``0``."""
    if os.environ.get("QCACHE_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    ok &= mallopt(M_TOP_PAD, TOP_PAD) == 1
    return bool(ok)
