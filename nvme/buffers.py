"""Aligned host buffers from a reusable pool: what O_DIRECT needs, with no allocation per IO.

What ``aligned_empty(numel, dtype)`` guarantees:

- a contiguous 1-D CPU tensor of ``numel`` elements whose ``data_ptr()`` is a multiple of
  ``ALIGNMENT`` (4096 bytes, which covers every O_DIRECT alignment Linux file systems ask
  for on 4 KiB-page machines);
- its memory continues, owned by this buffer alone, up to the next multiple of 4096 bytes
  past its last element (``padded_nbytes(t)``), so an O_DIRECT transfer of the padded
  length needs no staging (``SwapSpace`` uses this for blobs whose size is not a multiple
  of 4096);
- page-locked (pinned) when the machine has an accelerator (``hetmem.accelerator.host_pinning``),
  so device copies from it are asynchronous.

Reuse is explicit: ``release_buffer(t)`` hands the buffer back and the next request of
the same padded size gets it without allocating.  A buffer that is simply dropped is freed
by the garbage collector and is not reused: a view of it may outlive the tensor object,
so the pool cannot take it back on its own (the pool keeps no reference to buffers it
handed out).  Do not use a tensor (or a view of it) after releasing it.

``aligned_tensor(numel, dtype)`` is the same kind of buffer outside any pool, for owners
that keep their own free lists (the chunk manager's host payloads).
"""
from __future__ import annotations

import itertools
import logging
import threading
import weakref

import torch

from hetmem.accelerator import host_pinning

logger = logging.getLogger("hetmem.nvme.buffers")

ALIGNMENT = 4096


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _aligned_base(padded: int, pin: bool) -> torch.Tensor:
    """``padded`` bytes (uint8) starting on an ALIGNMENT boundary."""
    raw = torch.empty(padded + ALIGNMENT, dtype=torch.uint8, pin_memory=pin)
    skip = (-raw.data_ptr()) % ALIGNMENT
    return raw[skip:skip + padded]


def aligned_tensor(numel: int, dtype: torch.dtype = torch.uint8, *, pin: bool | None = None) -> torch.Tensor:
    """An aligned host tensor (pinned on accelerator machines unless ``pin`` says otherwise), in no pool: it is
    freed when dropped.  Its memory is padded to the next multiple of 4096 bytes."""
    pin = host_pinning() if pin is None else bool(pin)
    itemsize = torch.empty((), dtype=dtype).element_size()
    base = _aligned_base(_round_up(max(numel * itemsize, 1), ALIGNMENT), pin)
    return base.view(dtype)[:numel]


class BufferPool:
    """Aligned (pinned on accelerator machines) host buffers kept by padded size and handed out again."""

    def __init__(self, *, pin: bool | None = None, max_cached_bytes: int | None = None):
        # Pin when a GPU is present (decided once: a pool never mixes pinned and pageable).
        self.pin = host_pinning() if pin is None else bool(pin)
        # Released buffers beyond this many bytes are freed instead of kept (None: keep all).
        self.max_cached_bytes = max_cached_bytes
        self._lock = threading.Lock()
        self._free: dict[int, list[torch.Tensor]] = {}    # padded bytes -> free base buffers
        # data_ptr -> (padded bytes, token) of buffers handed out; no reference to the buffer
        # itself (a dropped buffer must be freed), and the entry goes when the tensor object dies
        self._out: dict[int, tuple[int, int]] = {}
        self._tokens = itertools.count()
        self._cached_bytes = 0
        self.allocations = 0  # buffers allocated from the system
        self.reuses = 0       # requests served from the pool

    def empty(self, numel: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """An aligned, uninitialised tensor of ``numel`` elements (see the module docstring)."""
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise ValueError(f"numel={numel!r} must be an int >= 0")
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype={dtype!r} must be a torch.dtype")
        itemsize = torch.empty((), dtype=dtype).element_size()
        padded = _round_up(max(numel * itemsize, 1), ALIGNMENT)
        with self._lock:
            free = self._free.get(padded)
            if free:
                base = free.pop()
                self._cached_bytes -= padded
                self.reuses += 1
            else:
                base = None
        if base is None:
            base = self._allocate(padded)
        tensor = base.view(dtype)[:numel] if numel else base[:0].view(dtype)
        ptr, token = base.data_ptr(), next(self._tokens)
        with self._lock:
            self._out[ptr] = (padded, token)
        weakref.finalize(tensor, self._forget, ptr, token)
        return tensor

    def _forget(self, ptr: int, token: int) -> None:
        with self._lock:
            if self._out.get(ptr, (None, None))[1] == token:
                del self._out[ptr]

    def _allocate(self, padded: int) -> torch.Tensor:
        base = _aligned_base(padded, self.pin)
        with self._lock:
            self.allocations += 1
        return base

    def release(self, tensor: torch.Tensor) -> None:
        """Give a buffer from ``empty()`` back; raises ValueError for any other tensor."""
        with self._lock:
            entry = self._out.pop(tensor.data_ptr(), None)
            if entry is None:
                raise ValueError("release_buffer: this tensor is not a buffer handed out by this pool "
                                 "(or it was released already); pass the tensor aligned_empty() returned")
            padded, _ = entry
            if self.max_cached_bytes is not None and self._cached_bytes + padded > self.max_cached_bytes:
                return  # dropped: freed when the last reference goes
            storage = tensor.untyped_storage()
            base = torch.empty(0, dtype=torch.uint8).set_(storage, tensor.data_ptr() - storage.data_ptr(), (padded,))
            self._free.setdefault(padded, []).append(base)
            self._cached_bytes += padded

    def padded_nbytes(self, tensor: torch.Tensor) -> int | None:
        """The bytes a handed-out buffer owns from its data_ptr (None if not from this pool)."""
        with self._lock:
            entry = self._out.get(tensor.data_ptr())
        return None if entry is None else entry[0]

    def clear(self) -> None:
        """Free every cached (released) buffer."""
        with self._lock:
            self._free.clear()
            self._cached_bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"allocations": self.allocations, "reuses": self.reuses, "outstanding": len(self._out),
                    "cached_bytes": self._cached_bytes}


_default_pool: BufferPool | None = None
_default_lock = threading.Lock()


def default_pool() -> BufferPool:
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = BufferPool()
        return _default_pool


def aligned_empty(numel: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An aligned (pinned on accelerator machines) host tensor from the default pool; see the module docstring."""
    return default_pool().empty(numel, dtype)


def release_buffer(tensor: torch.Tensor) -> None:
    """Return a tensor from ``aligned_empty`` to the default pool for reuse."""
    default_pool().release(tensor)


def padded_nbytes(tensor: torch.Tensor) -> int | None:
    """Bytes an ``aligned_empty`` buffer owns from its start (a multiple of 4096), else None."""
    return default_pool().padded_nbytes(tensor)
