"""Make freed chunk buffers go back to the operating system (glibc).

glibc serves large allocations with mmap and frees them with munmap, but after the first such
free it raises its mmap threshold to that size, so later chunk-sized buffers come from the
heap and stay in the process after they are freed: the process keeps growing past the host
budget though hetmem holds no more than the budget.  Setting the threshold explicitly
(mallopt M_MMAP_THRESHOLD) turns that adaptation off.  hetmem does it when it enforces a host
budget (the NVMe tier is on); elsewhere it leaves the allocator alone.

The threshold is 256 KiB, not 1 MiB: a step's activations and autograd temporaries of a few
hundred KiB (a 2x128x1024 bf16 activation is 512 KiB) came from the heap below 1 MiB, and their
holes stayed resident between and during steps.  On the 151.5M GPT with state on NVMe
(README "Memory overhead") glibc's heap held 30-43 MiB free at the peak of a step with 1 MiB and
1-2 MiB with 256 KiB, and peak RSS fell from 819-840 to 796-798 MiB; the price is about a quarter
more minor page faults per step (some 0.1 s of system CPU per step on that model).
``HETMEM_MMAP_THRESHOLD`` overrides it (a size such as "1MiB", 64 KiB to 32 MiB, or "glibc" to
leave glibc's adaptive threshold alone); a value that is neither raises ValueError naming it.

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
import os

import psutil

from hetmem._core.units import format_bytes, parse_size

logger = logging.getLogger("hetmem.host_memory")

M_MMAP_THRESHOLD = -3
THRESHOLD = 256 << 10  # buffers of 256 KiB and more are mmap'ed and returned to the OS when freed
ENV_THRESHOLD = "HETMEM_MMAP_THRESHOLD"
THRESHOLD_RANGE = (64 << 10, 32 << 20)  # glibc refuses more than 32 MiB (HEAP_MAX_SIZE / 2) on 64-bit
_applied: int | None = None  # the threshold this process set (None: not set by hetmem)


def mmap_threshold(environ=os.environ) -> int | None:
    """The threshold to apply: ``HETMEM_MMAP_THRESHOLD`` when set (None for "glibc"), else THRESHOLD.
    ValueError naming the variable, the value and the fix when it is not a size in range."""
    raw = environ.get(ENV_THRESHOLD)
    if raw is None or raw.strip() == "":
        return THRESHOLD
    if raw.strip().lower() == "glibc":
        return None
    low, high = THRESHOLD_RANGE
    try:
        value = parse_size(raw.strip(), key=ENV_THRESHOLD)
    except ValueError as exc:
        raise ValueError(f"{ENV_THRESHOLD}={raw!r} is not a size; give one like '256KiB' or '1MiB' "
                         f"({format_bytes(low)} to {format_bytes(high)}), or 'glibc' to leave glibc's "
                         f"threshold alone") from exc
    if not low <= value <= high:
        raise ValueError(f"{ENV_THRESHOLD}={raw!r} is outside {format_bytes(low)} to {format_bytes(high)}; "
                         f"give a size in that range, or 'glibc' to leave glibc's threshold alone")
    return value


def return_freed_buffers_to_os() -> bool:
    """Fix glibc's mmap threshold (``mmap_threshold()``); True if it was applied (or already was).
    Only where later allocations come from changes: buffers allocated before are freed as before."""
    global _applied
    threshold = mmap_threshold()  # raises on a bad HETMEM_MMAP_THRESHOLD before anything is changed
    if threshold is None:
        logger.info("%s=glibc: leaving glibc's adaptive mmap threshold alone", ENV_THRESHOLD)
        return False
    if _applied == threshold:
        return True
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        logger.info("not glibc: leaving the allocator's mmap threshold alone")
        return False
    if not mallopt(M_MMAP_THRESHOLD, threshold):
        logger.warning("glibc refused mmap threshold %d bytes; its own threshold stays", threshold)
        return False
    _applied = threshold
    logger.info("glibc mmap threshold fixed at %d bytes: freed chunk buffers and a step's temporaries from "
                "that size up go back to the OS instead of staying in glibc's heap (hetmem/host_memory.py; "
                "%s overrides)", threshold, ENV_THRESHOLD)
    return True


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
