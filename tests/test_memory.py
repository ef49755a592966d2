"""qcache.memory: the CLIs' allocator setting takes effect on glibc and can be switched off."""

from __future__ import annotations

import platform
import sys

import pytest

from qcache.memory import keep_freed_memory


def test_keep_freed_memory_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("QCACHE_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_takes_effect_on_glibc(monkeypatch):
    monkeypatch.delenv("QCACHE_KEEP_FREED_MEMORY", raising=False)
    assert keep_freed_memory() is True
