"""Freed memory goes back to the OS after a job (glibc's malloc_trim)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from onnx_lowrank import heap

SCRIPT = r"""
import numpy as np
from onnx_lowrank.heap import release_free_memory

def rss_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024

big = np.ones(2 << 20)  # 16 MiB, mmapped; freeing it raises glibc's mmap threshold to 16 MiB
del big
blocks = [np.ones(1 << 17) for _ in range(80)]  # 80 x 1 MiB, now served from the heap
before = rss_mib()
del blocks[::2]  # 40 holes between live blocks: no free top of the heap to shrink
freed = rss_mib()
release_free_memory()
print(before - freed, before - rss_mib())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or heap._malloc_trim() is None,
                    reason="glibc's allocator and malloc_trim")
def test_release_free_memory_returns_freed_heap_pages():
    # glibc's defaults: any MALLOC_* variable (dask sets MALLOC_TRIM_THRESHOLD_ when imported)
    # turns off the growing mmap threshold that this test relies on.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, env=env).stdout
    kept_after_free, returned_after_trim = (float(v) for v in out.split())
    assert kept_after_free < 8  # glibc kept the 40 MiB resident after free ...
    assert returned_after_trim > 30  # ... and malloc_trim gave it back
