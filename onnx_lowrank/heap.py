"""Give the memory freed by a finished job back to the operating system (glibc only).

glibc keeps freed memory for reuse: its threshold for serving an allocation from its own mmap
grows with every large block freed (up to 32 MiB), so after a few weights the temporaries of
the factorizations (Gram matrices, residual blocks, thin sketches of a few MiB) come from the
heap and stay resident after they are freed. For large models that is noise; for a model of
18 MiB (EfficientNet-Lite0) it was 14 MiB of a 150 MiB peak. ``malloc_trim`` after each job
returns the free pages at no measurable cost (0.44 s both ways for that model). A fixed,
lower mmap threshold would bound the growth too, but it made ``optimize`` 30-50% slower
(every temporary page-faults afresh), so it is not set.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

__all__ = ["release_free_memory"]


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or ``None`` elsewhere (macOS, musl, Windows: nothing to do)."""
    try:
        # The symbols already loaded into this process (the C library among them): no search
        # of the library path (ctypes.util.find_library would run ldconfig from a job thread).
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release_free_memory() -> None:
    """Return the allocator's free pages to the OS where the C library can (glibc)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
