"""Make freed chunk buffers go back to the operating system (glibc).

glibc serves large allocations with mmap and frees them with munmap, but after the first such
free it raises its mmap threshold to that size, so later chunk-sized buffers come from the
heap and stay in the process after they are freed: the process keeps growing past the host
budget though hetmem holds no more than the budget.  Setting the threshold explicitly
(mallopt M_MMAP_THRESHOLD) turns that adaptation off.  hetmem does it when it enforces a host
budget (the NVMe tier is on); elsewhere it leaves the allocator alone.

``available_host_bytes()`` is what the system can still give, for checks made before host
memory is used (engine.close() giving the weights back, optimizer state dicts).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

import psutil

logger = logging.getLogger("hetmem.host_memory")

M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 20  # buffers of 1 MiB and more are mmap'ed and returned to the OS when freed
_done = False


def return_freed_buffers_to_os() -> bool:
    """Fix glibc's mmap threshold at 1 MiB; True if it was applied (or already was)."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.info("not glibc: leaving the allocator's mmap threshold alone")
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    if _done:
        logger.info("glibc mmap threshold fixed at %d bytes: freed chunk buffers go back to the OS", THRESHOLD)
    return _done


def available_host_bytes() -> int:
    """Host memory the system can still give (psutil's ``available``)."""
    return psutil.virtual_memory().available
