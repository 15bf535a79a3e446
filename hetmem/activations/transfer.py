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

The accelerator seam backs these through the ``Mover`` it owns (issue on the side stream +
record an event; pinned host allocation; event synchronize; compute-stream wait); this file
names no device API of its own beyond torch's device-generic ``torch.accelerator``.
"""
from __future__ import annotations

import threading

import torch

from hetmem.chunk_manager.mover import Mover, Transfer

KEEP_FREE = 64  # free host buffers kept per size (they count against host_budget; trimmed when it is full)


class ActivationLink:
    def __init__(self, mover: Mover, device: torch.device, *, pin_host: bool):
        self.mover = mover              # the chunk manager's: one link, one queue of copies
        self.device = device            # the compute device
        self.pin_host = pin_host        # host buffers pinned (an accelerator is present)
        self._free: dict[int, list[torch.Tensor]] = {}  # nbytes -> free host buffers
        self._lock = threading.Lock()   # buffers come back from autograd's threads too

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_host)

    def give_back(self, buffer: torch.Tensor) -> None:
        """A host buffer nothing reads or writes any more."""
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
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, label: str) -> Transfer:
        return self.mover.copy(dst, src, label)

    @staticmethod
    def wait(transfer: Transfer) -> float:
        return transfer.wait()

    def wait_for_use(self, transfer: Transfer) -> float:
        """The compute device may read the copy's destination after this; host seconds blocked."""
        if self.device.type == "cpu":
            return transfer.wait()
        transfer.wait_on_stream(torch.accelerator.current_stream(self.device))
        return 0.0
