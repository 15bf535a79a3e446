"""Payload buffers per tier, reused where allocation is expensive.

Host buffers (pinned on accelerator machines) and host-memory "device" buffers are kept in
small free lists keyed by (tier, dtype, numel): pinning and first-touch page faults cost more
than the copy.  An accelerator's device buffers come from its caching allocator, which already
reuses them.  Every buffer handed back is shown to the accelerator seam first (the simulated
device raises when a copy into or out of it is still in flight).

A buffer goes back on a free list only when nothing else holds its storage (a view kept by
user code or autograd would otherwise see its bytes overwritten).
"""
from __future__ import annotations

import logging

import torch

from hetmem.accelerator import Accelerator

from .states import Tier

logger = logging.getLogger("hetmem.chunk_manager.buffers")

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def sole_owner(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` is the only holder of its storage."""
    if _use_count is None:
        return False  # cannot tell: never recycle
    # The temporary storage object made here counts once, the tensor once.
    return _use_count(tensor.untyped_storage()._cdata) <= 2


class BufferPool:
    def __init__(self, accelerator: Accelerator, keep_free: int = 2):
        self.accelerator = accelerator  # allocates device and (pinned) host buffers
        self.keep_free = keep_free      # free buffers kept per key
        self._free: dict[tuple[Tier, torch.dtype, int], list[torch.Tensor]] = {}
        self.cached_bytes = 0           # bytes in free lists (allocated, holding nothing)
        # allocates host buffers (dtype, numel); the NVMe tier swaps in aligned ones
        self.host_allocator = lambda dtype, numel: accelerator.host_empty(numel, dtype)

    def _recycles(self, tier: Tier) -> bool:
        return tier is Tier.HOST or not self.accelerator.separate_memory

    def take(self, tier: Tier, dtype: torch.dtype, numel: int) -> torch.Tensor:
        free = self._free.get((tier, dtype, numel))
        if free:
            buffer = free.pop()
            self.cached_bytes -= buffer.numel() * buffer.element_size()
            return buffer
        if tier is Tier.DEVICE:
            return self.accelerator.empty(numel, dtype)
        return self.host_allocator(dtype, numel)

    def give(self, tier: Tier, buffer: torch.Tensor) -> None:
        self.accelerator.released(buffer)
        if not self._recycles(tier) or not sole_owner(buffer):
            return
        free = self._free.setdefault((tier, buffer.dtype, buffer.numel()), [])
        if len(free) < self.keep_free:
            free.append(buffer)
            self.cached_bytes += buffer.numel() * buffer.element_size()

    def cached_on(self, tier: Tier) -> int:
        return sum(b.numel() * b.element_size() for (t, _, _), free in self._free.items() if t is tier
                   for b in free)

    def trim(self, tier: Tier) -> int:
        """Drop ``tier``'s free buffers (to make room under a budget); returns the bytes freed."""
        freed = 0
        for key in [k for k in self._free if k[0] is tier]:
            for buffer in self._free.pop(key):
                freed += buffer.numel() * buffer.element_size()
        self.cached_bytes -= freed
        return freed

    def clear(self) -> None:
        self._free.clear()
        self.cached_bytes = 0
