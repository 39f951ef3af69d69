"""Keep freed host memory for reuse in CPU runs (glibc's malloc).

glibc serves a large allocation with its own ``mmap`` and unmaps it when it is freed, and returns
the free top of its heap to the kernel beyond a small threshold. A training step on the CPU
allocates and frees the same multi-megabyte tensors every step, so every step faults all of their
pages in again (and the kernel zeroes each one). Measured on the APEX operator of the 34M-parameter
benchmark model (``benchmarks/bench_operator.py``, two threads): 12-14k minor page faults per step
and 84-94 ms, against none and 55-68 ms with the blocks kept; the plain training step has 3.5k.
Raising both thresholds keeps such blocks in the heap for the next step, as tcmalloc or jemalloc
(the allocators recommended for PyTorch on CPUs) would. Allocations above ``MMAP_THRESHOLD`` still
get their own mapping, and the heap's free top is returned to the kernel beyond ``TRIM_THRESHOLD``
(free blocks below the top stay, as with any malloc heap). The trainer applies it
on CPU runs; the converter does not (its peak memory is a measured target). GPU runs are untouched:
their large tensors live in CUDA's caching allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20
_APPLIED = False


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once); False where malloc is not
    glibc's (other platforms and C libraries keep their own behaviour)."""
    global _APPLIED
    if _APPLIED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no libc to load, or one without mallopt (musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Older glibc refuses an mmap threshold above 32 MiB (HEAP_MAX_SIZE / 2 on 64-bit): fall back to it.
    mmap = next((t for t in (MMAP_THRESHOLD, 32 << 20) if mallopt(M_MMAP_THRESHOLD, t) == 1), None)
    trim = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _APPLIED = mmap is not None and trim
    if _APPLIED:
        logger.debug("host memory: glibc keeps freed blocks below %d MiB for reuse", mmap >> 20)
    else:
        logger.info("host memory: glibc refused mallopt (mmap threshold set: %s, trim threshold set: %s); "
                    "CPU steps may fault their temporaries in again every step", mmap is not None, trim)
    return _APPLIED
