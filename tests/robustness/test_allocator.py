"""The malloc arena bound: applied on glibc, a no-op when switched off."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from service.observability.allocator import limit_malloc_arenas


def test_zero_leaves_the_allocator_alone() -> None:
    assert limit_malloc_arenas(0) is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="M_ARENA_MAX is a glibc setting")
def test_glibc_accepts_the_arena_bound() -> None:
    # In a child, so this test process keeps its own allocator settings.
    code = "from service.observability.allocator import limit_malloc_arenas as l; print(l(2))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"
