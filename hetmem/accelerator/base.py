"""What hetmem asks of a compute device, and the parts every backend shares."""
from __future__ import annotations

import time
from typing import Protocol

import psutil
import torch


class CopyEvent(Protocol):
    """Completion of one asynchronous copy."""

    def query(self) -> bool:
        """True once the copy has landed.  Pure: changes nothing."""

    def synchronize(self) -> None:
        """Block the host until the copy has landed."""


class Accelerator:
    """The compute device.  Subclasses override what differs; see the package docstring.

    Attributes (set by each backend, read-only afterwards):
        name             "cpu", "sim", or a torch device type ("cuda", "xpu", ...)
        device           where tensors of the compute device live
        separate_memory  the device has memory of its own: chunks on it cost device bytes that
                         allocator statistics see, copies to and from it are asynchronous, and
                         the optimizer may update chunks there
        pin_host         host buffers meant for device copies are page-locked
    """

    name = "abstract"
    device = torch.device("cpu")
    separate_memory = False
    pin_host = False

    def __init__(self) -> None:
        # the allocator's all-time peak when ``new_peak`` last looked; the allocator's peak
        # statistics belong to the user and are never reset here
        self._seen_peak = 0

    # -- buffers ---------------------------------------------------------------------------

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised 1-D buffer on the compute device."""
        return torch.empty(numel, dtype=dtype, device=self.device)

    def host_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised 1-D host buffer (page-locked when ``pin_host``)."""
        return torch.empty(numel, dtype=dtype, pin_memory=self.pin_host)

    def released(self, buffer: torch.Tensor) -> None:
        """``buffer`` goes back to a free list or is dropped.  Backends that can tell check that
        no copy into or out of it is still in flight (the simulated device raises)."""

    def check_colocated(self, *tensors: torch.Tensor) -> None:
        """Raise when one operation would mix device and host tensors (real devices raise by
        themselves; the simulated device, whose buffers are host memory, checks here)."""

    # -- copies ----------------------------------------------------------------------------

    def copy_stream(self) -> object:
        """A queue for asynchronous copies, ordered after the compute work already issued."""
        raise NotImplementedError

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: object, label: str = "") -> CopyEvent:
        """Start ``dst.copy_(src)`` on ``stream``; neither may be touched before its event."""
        raise NotImplementedError

    def compute_waits(self, event: CopyEvent) -> float:
        """Make later compute see the copy.  On a real device the compute stream waits without
        blocking the host; where the host computes, the host blocks.  Returns seconds blocked."""
        started = time.perf_counter()
        event.synchronize()
        return time.perf_counter() - started

    def close_stream(self, stream: object) -> None:
        """Let the copies on ``stream`` finish and free what it holds."""

    def synchronize(self) -> None:
        """Block until all work issued to the device has finished."""

    # -- memory statistics -------------------------------------------------------------------

    def memory_allocated(self) -> int:
        """Bytes the allocator has handed out on the device now (0 without an allocator)."""
        return 0

    def max_memory_allocated(self) -> int:
        """The allocator's all-time peak of ``memory_allocated`` (the user's statistic)."""
        return 0

    def memory_reserved(self) -> int:
        """Bytes the allocator holds from the device, handed out or cached."""
        return 0

    def reset_peak_memory_stats(self) -> None:
        """The user's reset of the allocator's peak (benchmarks and tests call it; hetmem never)."""

    def new_peak(self) -> int | None:
        """The allocator's all-time peak if it rose since the previous call, else None.

        hetmem keeps its interval peaks from this and its own samples (tracer/probes.py), so the
        allocator's peak statistics, which belong to the user, are never reset."""
        peak = self.max_memory_allocated()
        if peak > self._seen_peak:
            self._seen_peak = peak
            return peak
        return None

    def margin(self, device_budget: int) -> int:
        """Bytes of ``device_budget`` kept free for allocator slack (none without an allocator)."""
        return 0

    def budget_for(self, need: int) -> int:
        """The smallest device budget whose part left after ``margin`` holds ``need`` bytes."""
        return need

    def free_memory(self) -> tuple[int, int]:
        """(free, total) bytes of the device's memory."""
        mem = psutil.virtual_memory()
        return mem.available, mem.total

    def device_count(self) -> int:
        return 1

    def set_memory_fraction(self, fraction: float) -> None:
        """Cap this process's share of the device's memory (where an allocator can)."""

    def empty_cache(self) -> None:
        """Give cached, unused device memory back (where an allocator caches)."""

    @property
    def out_of_memory(self) -> type[BaseException]:
        return MemoryError

    # -- saved activations (probes on devices whose allocator the host cannot read) ----------

    def hold_saved(self, tensor: torch.Tensor) -> object:
        """What autograd keeps instead of ``tensor`` (a backend may count its bytes)."""
        return tensor

    @staticmethod
    def unwrap(packed: object) -> torch.Tensor:
        return packed

    def hold_output(self, tensor: torch.Tensor) -> None:
        """A module returned ``tensor`` (a backend may count its bytes while it lives)."""

    def forget_activations(self) -> None:
        """After an aborted step: stop counting what it left behind."""

    # -- random state ------------------------------------------------------------------------

    def rng_state(self) -> list[torch.Tensor] | None:
        """The device generators' states (None: the device has none of its own)."""
        return None

    def set_rng_state(self, state: list[torch.Tensor] | None) -> None:
        """Restore what ``rng_state`` returned (ignored where the device has no generators)."""

    # -- description -------------------------------------------------------------------------

    def describe(self) -> dict:
        return {"name": self.name, "device": str(self.device)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device})"
