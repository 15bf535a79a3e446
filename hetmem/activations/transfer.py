"""The device-specific half of activation offload: buffers and copies, nothing else.

Everything that differs between the CPU and an accelerator goes through ``ActivationLink``:

- ``host_buffer(nbytes)``: a host byte buffer, pinned on an accelerator (reused by size:
  pinning costs more than the copy);
- ``device_buffer(nbytes)``: a byte buffer on the compute device;
- ``copy(dst, src, label)``: start ``dst.copy_(src)`` and return the ``Transfer`` in flight —
  through the chunk manager's ``Mover``, so on an accelerator it runs on the side stream with
  an event (and the allocator is told the source is in use there), on the CPU on the mover's
  worker thread;
- ``wait(transfer)``: block the host until the copy is complete; seconds blocked;
- ``wait_for_use(transfer)``: make the compute device wait for a copy before it reads the
  destination: on the CPU the same as ``wait``; on an accelerator the compute stream waits on
  the copy's event and the host goes on (``Transfer.wait_on_stream``).

All of it goes through the accelerator seam (hetmem/accelerator/): ``Accelerator.host_empty``
and ``empty`` for buffers, ``released`` when a host buffer goes back to the free list, the
``Mover``'s copy stream for copies and ``Transfer.wait_for_compute`` for the compute wait.
"""
from __future__ import annotations

import threading

import torch

from hetmem.accelerator import Accelerator
from hetmem.chunk_manager.mover import Mover, Transfer

KEEP_FREE = 64  # free host buffers kept per size (they count against host_budget; trimmed when it is full)


class ActivationLink:
    def __init__(self, mover: Mover, accelerator: Accelerator):
        self.mover = mover              # the chunk manager's: one link, one queue of copies
        self.accelerator = accelerator  # allocates device and (pinned) host buffers, waits
        self.device = accelerator.device  # where compute-device tensors live
        self._free: dict[int, list[torch.Tensor]] = {}  # nbytes -> free host buffers
        self._lock = threading.Lock()   # buffers come back from autograd's threads too

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                return free.pop()
        return self.accelerator.host_empty(nbytes, torch.uint8)

    def give_back(self, buffer: torch.Tensor) -> None:
        """A host buffer nothing reads or writes any more."""
        self.accelerator.released(buffer)
        with self._lock:
            free = self._free.setdefault(buffer.numel(), [])
            if len(free) < KEEP_FREE:
                free.append(buffer)

    def cached_bytes(self) -> int:
        with self._lock:
            return sum(n * len(free) for n, free in self._free.items())

    def trim(self) -> None:
        with self._lock:
            self._free.clear()

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        return self.accelerator.empty(nbytes, torch.uint8)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, label: str) -> Transfer:
        return self.mover.copy(dst, src, label)

    @staticmethod
    def wait(transfer: Transfer) -> float:
        return transfer.wait()

    def wait_for_use(self, transfer: Transfer) -> float:
        """The compute device may read the copy's destination after this; host seconds blocked."""
        return transfer.wait_for_compute(self.accelerator)
