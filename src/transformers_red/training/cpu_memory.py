"""Keeping freed CPU memory in the process (glibc), so training steps stop page-faulting it back in.

glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh `mmap` pages and returns them on
`free`. A distillation step on CPU allocates many logit- and activation-sized temporaries, so every step
faults GiBs of pages back in: on SmolLM2-135M (batch 8 x 256, one thread) about 4 s of a 31 s step
(docs/performance.md). `keep_freed_cpu_memory()` sets `M_MMAP_MAX = 0` (no mmap'd chunks: large blocks come
from the heap and are reused) and `M_TRIM_THRESHOLD` to its largest value, 2 GiB (free space at the top of the
heap is kept up to that size). Running with `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736` in the
environment does the same with a larger threshold. The process keeps about its peak resident size instead of
returning memory between steps; nothing else changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int


@functools.lru_cache(maxsize=1)
def keep_freed_cpu_memory() -> bool:
    """Apply the glibc settings once per process; returns whether they are in effect (False off glibc)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
