"""Memory probes: how many non-model bytes (activations, temporaries) are live on the device.

On an accelerator the allocator says it (through the seam, hetmem/accelerator/): allocated
bytes minus the chunk bytes hetmem placed there, with an interval peak hetmem keeps itself,
never resetting the allocator's peak (the user's statistic).  On the CPU there is no such
counter for one purpose, so the probe counts what autograd saves for backward (saved-tensor
hooks) and what modules return, by distinct storage, for as long as they are held.
"""
from __future__ import annotations

import threading
import weakref

import torch


def storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(data_ptr, nbytes) of the tensor's storage, or None for tensors without one."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, wrapper subclasses
        return None
    nbytes = storage.nbytes()
    return (storage.data_ptr(), nbytes) if nbytes else None


class LiveBytes:
    """Bytes of distinct storages currently held by tracked holders, and their peak.

    Holders are released from autograd's threads too, hence the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, list[int]] = {}  # storage data_ptr -> [nbytes, holders]
        self.current = 0                       # bytes held now
        self.peak = 0                          # max of current since reset_peak()
        # saved activations moved to host memory (hetmem/activations): their bytes, and the
        # peak of current + those bytes, i.e. the peak had nothing been moved (the trace's)
        self.moved_off = 0
        self.natural_peak = 0                  # since reset_peak()
        self.last_natural_peak = 0             # of the interval the last reset_peak() closed

    def hold(self, key: tuple[int, int]) -> None:
        ptr, nbytes = key
        with self._lock:
            entry = self._held.get(ptr)
            if entry is None:
                self._held[ptr] = [nbytes, 1]
                self.current += nbytes
                if self.current > self.peak:
                    self.peak = self.current
                if self.current + self.moved_off > self.natural_peak:
                    self.natural_peak = self.current + self.moved_off
            else:
                entry[1] += 1

    def release(self, key: tuple[int, int]) -> None:
        ptr, _ = key
        with self._lock:
            entry = self._held.get(ptr)
            if entry is None:
                return  # released after a reset(): nothing to undo
            entry[1] -= 1
            if entry[1] == 0:
                del self._held[ptr]
                self.current -= entry[0]

    def shift(self, delta: int) -> None:
        """``delta`` bytes moved off the device (> 0, after their release) or back (< 0, before
        their new hold), so that ``current + moved_off`` only ever dips, never spikes."""
        with self._lock:
            self.moved_off = max(0, self.moved_off + delta)

    def reset_peak(self) -> int:
        """The peak since the last reset; the new interval starts at the current level."""
        with self._lock:
            peak, self.peak = self.peak, self.current
            self.last_natural_peak = self.natural_peak
            self.natural_peak = self.current + self.moved_off
            return peak

    def reset(self) -> None:
        with self._lock:
            self._held.clear()
            self.current = self.peak = self.moved_off = self.natural_peak = self.last_natural_peak = 0


class _Holder:
    """Wraps a saved tensor; its death (autograd freed the saved value) releases the bytes."""

    __slots__ = ("tensor", "_key", "_live", "__weakref__")

    def __init__(self, tensor: torch.Tensor, key: tuple[int, int], live: LiveBytes):
        self.tensor = tensor
        self._key = key
        self._live = live
        live.hold(key)

    def __del__(self) -> None:
        self._live.release(self._key)


class CpuProbe:
    """Non-model bytes on a CPU compute device, from saved tensors and module outputs."""

    def __init__(self) -> None:
        self.live = LiveBytes()

    def hold_saved(self, tensor: torch.Tensor) -> object:
        """For the pack hook: returns what autograd should keep instead of the tensor."""
        key = storage_key(tensor)
        return tensor if key is None else _Holder(tensor, key, self.live)

    @staticmethod
    def unwrap(packed: object) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Holder) else packed

    def hold_output(self, tensor: torch.Tensor) -> None:
        key = storage_key(tensor)
        if key is None:
            return
        self.live.hold(key)
        # Released when the Python tensor object dies (its storage may live on in a saved
        # tensor, which holds it separately).
        weakref.finalize(tensor, self.live.release, key)

    def current(self, chunk_bytes: int) -> int:
        return self.live.current

    def interval_peak(self, chunk_bytes_min: int) -> int:
        return self.live.reset_peak()

    def shift(self, delta: int) -> None:
        """Saved activations moved to host memory (> 0) or coming back (< 0); hetmem/activations."""
        self.live.shift(delta)

    @property
    def last_natural_peak(self) -> int:
        """The closed interval's peak had no saved activation been moved to host memory."""
        return self.live.last_natural_peak

    def forget(self) -> None:
        """After an aborted step: stop counting what it left behind."""
        self.live.reset()


class AllocatorProbe:
    """Non-model bytes on an accelerator: allocator statistics less hetmem's chunk bytes.

    The allocator's peak is never reset (it is the user's statistic).  Instead the probe asks,
    at every instant the scheduler measures (``current``) and at the end of each interval,
    whether the allocator's all-time peak rose since it last asked: if so, that peak happened
    since the previous sample, while hetmem's chunk bytes were what that sample saw, so the
    non-model peak is known exactly.  Otherwise the interval's peak is the largest sample, a
    temporary between two samples being what the budget's margin is for.  Reserved-but-free
    bytes (fragmentation) are reported separately by ``reserved()``.  Saved tensors and outputs
    are shown to the accelerator, which counts them where no allocator can be read (the
    simulated device).
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator      # hetmem.accelerator.Accelerator with separate memory
        self._peak = 0                      # largest non-model bytes seen in this interval
        self._chunk_bytes = 0               # chunk bytes at the last sample
        # saved activations moved to host memory (hetmem/activations): their bytes now; the
        # largest non-model + moved bytes seen in this interval (moved bytes change only at a
        # sample, see shift()); that of the interval interval_peak() closed last
        self.moved_off = 0
        self._natural_peak = 0
        self.last_natural_peak = 0

    def hold_saved(self, tensor: torch.Tensor) -> object:
        return self.accelerator.hold_saved(tensor)

    def unwrap(self, packed: object) -> torch.Tensor:
        return self.accelerator.unwrap(packed)

    def hold_output(self, tensor: torch.Tensor) -> None:
        self.accelerator.hold_output(tensor)

    def _note_rise(self, chunk_bytes: int) -> None:
        risen = self.accelerator.new_peak()
        if risen is not None:  # since the last sample, when min(then, now) chunk bytes were placed
            self._peak = max(self._peak, risen - min(self._chunk_bytes, chunk_bytes))
            self._natural_peak = max(self._natural_peak, risen - min(self._chunk_bytes, chunk_bytes) + self.moved_off)

    def current(self, chunk_bytes: int) -> int:
        self._note_rise(chunk_bytes)
        now = max(0, self.accelerator.memory_allocated() - chunk_bytes)
        self._peak = max(self._peak, now)
        self._natural_peak = max(self._natural_peak, now + self.moved_off)
        self._chunk_bytes = chunk_bytes
        return now

    def interval_peak(self, chunk_bytes_min: int) -> int:
        self._note_rise(self._chunk_bytes)
        peak, self._peak = self._peak, 0
        self.last_natural_peak, self._natural_peak = self._natural_peak, 0
        return peak

    def shift(self, delta: int) -> None:
        """Saved activations moved to host memory (> 0, after their release) or coming back
        (< 0, before their new allocation): a sample closes the segment with the old amount."""
        self._note_rise(self._chunk_bytes)
        self.moved_off = max(0, self.moved_off + delta)

    def reserved(self) -> int:
        return self.accelerator.memory_reserved()

    def forget(self) -> None:
        """After an aborted step: the accelerator stops counting what it left behind."""
        self.accelerator.forget_activations()
        self.moved_off = 0


def make_probe(accelerator) -> "CpuProbe | AllocatorProbe":
    return AllocatorProbe(accelerator) if accelerator.separate_memory else CpuProbe()
