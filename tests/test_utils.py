"""Shared helpers: the allocator setting used by the CLI and the benchmarks."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from vpt_robust.utils import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_sets_glibc_thresholds() -> None:
    assert keep_freed_memory() is True


def test_keep_freed_memory_rejects_values_a_c_int_cannot_hold() -> None:
    with pytest.raises(ValueError, match="mmap_threshold: 1099511627776 bytes"):
        keep_freed_memory(mmap_threshold=1 << 40)
    with pytest.raises(ValueError, match="trim_threshold: 0 bytes"):
        keep_freed_memory(trim_threshold=0)


def test_keep_freed_memory_without_a_c_library_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "/nonexistent/libc.so")
    assert keep_freed_memory() is False
