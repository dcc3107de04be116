"""glibc malloc settings for relaying large bodies. No effect elsewhere (musl, macOS).

Every socket read hands Python a new ``bytes`` object of up to 256 KiB (uvloop's read size),
freed once it has been written on. glibc serves an allocation above ``M_MMAP_THRESHOLD``
with a fresh ``mmap``, and gives freed memory at the top of its heap back to the kernel
above ``M_TRIM_THRESHOLD``: so each relayed body page was faulted in anew. Measured with
``perf stat -e page-faults`` on 1 MiB responses at 64 connections: about 256 faults per
response (one per 4 KiB page), and half the throughput. glibc's own adaptive threshold
did not settle it; it flipped between runs.

Fixing both thresholds keeps those buffers in the heap, reused: page faults fell from
1.3 million to 6 thousand over 5 s, and 1 MiB throughput rose from about 1,050 to 1,770
responses/s. The cost: up to ``TRIM_THRESHOLD`` of freed heap kept mapped after a burst.
A user's own ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` wins.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20  # above uvloop's 256 KiB reads, with room to spare
# Above the buffers in flight at once: 64 connections x 256 KiB already churn 16 MiB at the
# top of the heap, and 8 MiB measured no better than the default.
TRIM_THRESHOLD = 32 << 20


def tune_malloc() -> bool:
    """Set the thresholds through ``mallopt``; False where there is no glibc to tune, or the
    user set them in the environment."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter already uses
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done: bool = (
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
    log.debug("malloc thresholds %s", "set" if done else "not set (no glibc mallopt)")
    return done
