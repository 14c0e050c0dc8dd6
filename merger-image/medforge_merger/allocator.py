"""The C allocator's settings for a merge process.

A merge builds the same few megabyte-sized temporaries for every layer. glibc returns freed
memory at the top of its heap to the kernel once more than its trim threshold (a few MiB,
adjusted as it goes) is free, and maps larger blocks afresh for each request, so every layer's
temporaries were new pages again: in a virtual machine each page fault is tens of
microseconds, and for knots-ties they cost as long as the arithmetic. A merge is a short-lived
process whose peak is set by its largest layer anyway, so it keeps what it freed for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # free memory kept before any is given back
MAP_ABOVE_BYTES = 32 << 20  # only blocks above this get their own mapping (glibc's maximum)


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds; False (and nothing changed) on other C libraries."""
    if platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    return bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)) and bool(
        libc.mallopt(M_MMAP_THRESHOLD, MAP_ABOVE_BYTES)
    )
