"""Make freed chunk buffers go back to the operating system (glibc).

glibc serves large allocations with mmap and frees them with munmap, but after the first such
free it raises its mmap threshold to that size, so later chunk-sized buffers come from the
heap and stay in the process after they are freed: the process keeps growing past the host
budget though hetmem holds no more than the budget.  Setting the threshold explicitly
(mallopt M_MMAP_THRESHOLD) turns that adaptation off.  hetmem does it when it enforces a host
budget (the NVMe tier is on); elsewhere it leaves the allocator alone.

Without the NVMe tier the threshold is left alone, so chunk-sized buffers freed once come from
glibc's heap and stay resident: the fp32 GRAD chunks of the warm-up step (4 bytes per parameter,
freed when gradients move into the PARAM slots after it) kept a 57M-parameter bf16 run 265 MiB
above its chunks for the rest of the run.  ``trim_freed_memory()`` (malloc_trim) hands such free
heap pages back once, after that release, at no cost to later steps.

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
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        logger.info("not glibc: leaving the allocator's mmap threshold alone")
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    if _done:
        logger.info("glibc mmap threshold fixed at %d bytes: freed chunk buffers go back to the OS", THRESHOLD)
    return _done


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def trim_freed_memory() -> bool:
    """Give the free pages of glibc's heaps back to the OS now (malloc_trim(0)); True if any were."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        logger.info("not glibc: no malloc_trim; freed host buffers stay with the allocator")
        return False
    released = bool(trim(0))
    logger.info("malloc_trim: %s", "free heap pages returned to the OS" if released else "nothing to return")
    return released


def available_host_bytes() -> int:
    """Host memory the system can still give (psutil's ``available``)."""
    return psutil.virtual_memory().available
