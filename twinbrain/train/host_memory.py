"""The C allocator's settings for training on CPU.

A train step frees and re-allocates the same activations every step. glibc serves allocations above its
(dynamic) mmap threshold with fresh mappings and returns freed heap memory above ``M_TRIM_THRESHOLD`` to the
system, so every step faulted hundreds of MB of zeroed pages back in (at the reference shapes,
bench/train_step_reference.py: 80-125 k minor faults and 0.15-0.24 CPU-s of system time per ~3.5 CPU-s step).
Keeping freed memory in the process removes that; the RSS peak is the same, it is just not given back between
steps.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # glibc's mallopt parameters
MMAP_THRESHOLD_MAX = 32 << 20                    # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 2 ** 31 - 1                     # mallopt takes a C int


def keep_freed_memory() -> bool:
    """Serve allocations up to 32 MiB from the heap and keep freed heap memory in the process (glibc on
    Linux; elsewhere nothing). Both thresholds are set: setting either one fixes both (glibc's dynamic
    adjustment stops), and the trim threshold alone left the mmap threshold at 128 KiB — measured 1.6 M
    faults and 3 CPU-s of system time per step. Returns whether the settings were applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):                # not glibc (e.g. musl): leave the allocator alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
