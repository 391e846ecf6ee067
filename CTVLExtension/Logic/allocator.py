"""Keep freed memory in the process for reuse (glibc): CPU training and batch runs allocate the same large tensors
again and again.

A CPU step of the demo model frees and reallocates buffers of 10^7-10^8 floats. glibc serves each block over its mmap
threshold (at most 32 MiB) with a fresh mmap and returns it with munmap when freed, so every step touches those
pages anew: the kernel zero-fills them, one page fault per 4 KiB. `retain_freed_memory` turns mmap off for
allocations (`M_MMAP_MAX` = 0) and heap trimming off (`M_TRIM_THRESHOLD` at its maximum): freed blocks stay in the
heap and the next step reuses them. The numbers computed are the same; the process keeps its peak memory until it
exits. On a 2-core AVX2 EPYC a demo training step (fp32, batch 16) went from 11.5 to 5.0 s
(`benchmarks/train_step_speed.py`, README).

Called by the command lines (`python -m training`, `ctvl`) and the benchmarks that time them; not by the library
itself, so a long-lived host (3D Slicer) keeps the default and gives memory back. `CTVL_RETAIN_FREED_MEMORY=0` in
the environment turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_MAX = -4
TRIM_NEVER = 2**31 - 1  # mallopt takes an int
ENV = "CTVL_RETAIN_FREED_MEMORY"
_applied = False


def retain_freed_memory() -> bool:
    """Set glibc to keep freed memory for reuse (see module docstring); True when it is in effect.

    False, doing nothing, where the C library is not glibc (macOS, Windows, musl) or ``CTVL_RETAIN_FREED_MEMORY=0``.
    Safe to call more than once."""
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        log.debug("%s is off: glibc returns freed memory to the OS", ENV)
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_NEVER) != 1:
        log.debug("glibc refused mallopt; its defaults stay")
        return False
    _applied = True
    log.debug("glibc keeps freed memory for reuse (no mmap, no trim); %s=0 turns this off", ENV)
    return True
