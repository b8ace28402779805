"""Keep freed CPU memory in the process instead of handing it back to the kernel.

glibc serves allocations above 128 KiB-32 MiB with fresh mmap()s and returns them on free, so
every step's activations page-fault anew. On virtual machines those faults are slow and
erratic: the same decode attention call took 0.5 ms or 4 ms depending on the run. Raising
the mmap and trim thresholds makes glibc reuse its heap, as a GPU caching allocator does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = (1 << 31) - 1


@functools.cache
def reuse_freed_memory() -> bool:
    """Apply the thresholds once per process; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
