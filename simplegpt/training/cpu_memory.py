"""Keeping freed memory in the process during CPU training (glibc's malloc).

A training step frees all its activations and gradients and allocates them again in the next one.
glibc hands large blocks back to the kernel (munmap, or trimming the heap top) as they are freed,
so every step faults its buffers back in page by page: ~700-1,000 page faults per step for the
small CPU model of bench/train_throughput.py on PyTorch's ops (the native whole-model step
allocates far less), ~7% of one share's step (docs/benchmarks.md). Within
`keep_freed_memory()` malloc keeps freed memory for reuse instead; at the end the free memory
beyond a modest threshold is returned. Elsewhere (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling (64-bit): blocks beyond this are always mapped
KEEP_BYTES = 1 << 30  # during: up to this much free memory at the top of a heap stays
AFTER_TRIM = 2 * MMAP_THRESHOLD_MAX  # after: the threshold glibc's own adaptive setting would reach


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # present in glibc only
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True):
    """Within the block, freed memory stays in the process for the next allocations (glibc only;
    otherwise, or with enabled=False, nothing changes)."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)
    libc.mallopt(M_TOP_PAD, 16 << 20)
    try:
        yield
    finally:
        libc.mallopt(M_TOP_PAD, 0)
        libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM)
        libc.malloc_trim(0)
