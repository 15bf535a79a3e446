"""A simulated asynchronous device for tests on machines without an accelerator.

Its buffers are host memory, but it behaves like a GPU where synchronisation bugs hide:

- copies run on their own thread (one per copy stream, in order, like a stream) and land
  after a random delay; their events complete only when they have landed;
- a copy's destination holds NaN from the moment the copy is issued until it lands, and a
  fresh device buffer holds NaN, so code that reads without waiting computes with poison and
  breaks parity;
- a copy whose source changed while it was in flight fails its event (``SimProtocolError``);
- returning or freeing a buffer while a copy into or out of it is in flight raises
  (``released``), and one operation mixing device and host buffers raises (``check_colocated``);
- allocator statistics: device buffers plus the activations autograd saves and modules return
  count as allocated, with an all-time peak that only a user's reset clears, so the
  allocator-statistics probe path runs as on a GPU.

Select it with ``HETMEM_DEVICE=sim`` (hetmem/accelerator/__init__.py).  ``HETMEM_SIM_DELAY_MS``
sets the largest copy delay (default 0.5 ms).
"""
from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
import weakref

import psutil
import torch

from .base import Accelerator

logger = logging.getLogger("hetmem.accelerator.sim")

DELAY_ENV = "HETMEM_SIM_DELAY_MS"
MEMORY_CAP = 16 << 30   # the simulated device's size, at most


class SimProtocolError(RuntimeError):
    """hetmem broke the asynchronous-copy protocol (found by the simulated device)."""


def _storage(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


class SimEvent:
    """Completes when its copy has landed on the copy thread."""

    def __init__(self, label: str):
        self.label = label
        self.error: BaseException | None = None
        self._landed = threading.Event()

    def query(self) -> bool:
        return self._landed.is_set()

    def synchronize(self) -> None:
        self._landed.wait()
        if self.error is not None:
            raise self.error


class SimStream:
    """A copy thread: copies land in issue order, each after a random delay."""

    def __init__(self, sim: "SimAccelerator"):
        self._sim = sim
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="hetmem-sim-copy", daemon=True)
        self._thread.start()

    def submit(self, work) -> None:
        self._queue.put(work)

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            dst, src, snapshot, event, delay, keys = work
            time.sleep(delay)
            try:
                if snapshot is not None and not _same_bytes(src, snapshot):
                    raise SimProtocolError(f"sim device: the source of copy '{event.label}' changed while the "
                                           f"copy was in flight; wait for its event before writing it")
                dst.copy_(src)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the event
                event.error = exc
            self._sim._landed(keys)
            event._landed.set()
            del work, dst, src, snapshot  # a landed copy holds no buffer (the allocator would count it)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


class _Saved:
    """A saved activation counted as allocated device bytes while autograd holds it."""

    __slots__ = ("tensor", "_key", "_sim", "__weakref__")

    def __init__(self, tensor: torch.Tensor, key: tuple[int, int], sim: "SimAccelerator"):
        self.tensor, self._key, self._sim = tensor, key, sim
        sim._hold(key)

    def __del__(self) -> None:
        self._sim._drop(self._key)


class SimAccelerator(Accelerator):
    name = "sim"
    device = torch.device("cpu")
    separate_memory = True
    pin_host = False

    def __init__(self, max_delay_s: float | None = None, seed: int = 0):
        super().__init__()
        if max_delay_s is None:
            max_delay_s = float(os.environ.get(DELAY_ENV, "0.5")) / 1000
        self.max_delay_s = max_delay_s          # a copy lands after uniform(0, max_delay_s)
        self._random = random.Random(seed)
        self._lock = threading.Lock()           # copy threads and autograd threads update the counts
        self._buffers: dict[int, int] = {}      # storage data_ptr of live device buffers -> bytes
        self._in_flight: dict[int, list] = {}   # storage data_ptr -> [copies touching it, label]
        self._activations: dict[int, list] = {} # storage data_ptr -> [bytes, holders] of counted activations
        self._allocated = 0                     # device buffers + activations, bytes
        self._peak = 0                          # all-time peak of _allocated (the "user's" statistic)
        self.copies = 0                         # copies issued, in total

    # -- buffers ---------------------------------------------------------------------------

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = torch.empty(numel, dtype=dtype)
        if buffer.is_floating_point():
            buffer.fill_(float("nan"))          # uninitialised device memory
        storage = buffer.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        with self._lock:
            self._buffers[ptr] = nbytes
            self._add(nbytes)
        weakref.finalize(storage, self._free, ptr, nbytes)
        return buffer

    def _free(self, ptr: int, nbytes: int) -> None:
        with self._lock:
            if self._buffers.pop(ptr, None) is not None:
                self._allocated -= nbytes
            if ptr in self._in_flight:
                logger.error("sim device: a buffer was freed while copy '%s' was in flight", self._in_flight[ptr][1])

    def _add(self, nbytes: int) -> None:
        self._allocated += nbytes
        if self._allocated > self._peak:
            self._peak = self._allocated

    def is_device_buffer(self, tensor: torch.Tensor) -> bool:
        return tensor.untyped_storage().data_ptr() in self._buffers

    def released(self, buffer: torch.Tensor) -> None:
        ptr = buffer.untyped_storage().data_ptr()
        with self._lock:
            flight = self._in_flight.get(ptr)
        if flight is not None:
            raise SimProtocolError(f"sim device: a buffer ({buffer.numel()} x {buffer.dtype}) was released while "
                                   f"copy '{flight[1]}' into or out of it is in flight; wait for the copy first")

    def check_colocated(self, *tensors: torch.Tensor) -> None:
        places = {self.is_device_buffer(t) for t in tensors}
        if len(places) > 1:
            raise SimProtocolError("sim device: one operation mixes device and host tensors (on a GPU: "
                                   "'Expected all tensors to be on the same device')")

    # -- copies ----------------------------------------------------------------------------

    def copy_stream(self) -> SimStream:
        return SimStream(self)

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: SimStream, label: str = "") -> SimEvent:
        event = SimEvent(label or f"{src.numel()} x {src.dtype}")
        keys = (_storage(dst)[0], _storage(src)[0])
        with self._lock:
            for key in keys:
                entry = self._in_flight.setdefault(key, [0, event.label])
                entry[0] += 1
        snapshot = src.clone() if src.is_contiguous() else None
        if dst.is_floating_point():
            dst.fill_(float("nan"))             # poison until the copy lands
        self.copies += 1
        stream.submit((dst, src, snapshot, event, self._random.uniform(0.0, self.max_delay_s), keys))
        return event

    def _landed(self, keys: tuple[int, int]) -> None:
        with self._lock:
            for key in keys:
                entry = self._in_flight.get(key)
                if entry is not None:
                    entry[0] -= 1
                    if entry[0] == 0:
                        del self._in_flight[key]

    def in_flight(self) -> int:
        """Storages with a copy in flight now."""
        with self._lock:
            return len(self._in_flight)

    def close_stream(self, stream: SimStream) -> None:
        stream.close()

    # -- memory statistics -------------------------------------------------------------------

    def memory_allocated(self) -> int:
        return self._allocated

    def max_memory_allocated(self) -> int:
        return self._peak

    def memory_reserved(self) -> int:
        with self._lock:
            return sum(self._buffers.values())

    def reset_peak_memory_stats(self) -> None:
        """What a user's ``reset_peak_memory_stats`` does; hetmem never calls it."""
        self._peak = self._allocated

    def free_memory(self) -> tuple[int, int]:
        total = min(MEMORY_CAP, psutil.virtual_memory().available // 2)
        return max(0, total - self._allocated), total

    # -- saved activations count as allocated, as on a GPU ----------------------------------

    def hold_saved(self, tensor: torch.Tensor) -> object:
        key = self._activation_key(tensor)
        return tensor if key is None else _Saved(tensor, key, self)

    @staticmethod
    def unwrap(packed: object) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Saved) else packed

    def hold_output(self, tensor: torch.Tensor) -> None:
        key = self._activation_key(tensor)
        if key is not None:
            self._hold(key)
            weakref.finalize(tensor, self._drop, key)

    def _activation_key(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        try:
            ptr, nbytes = _storage(tensor)
        except (RuntimeError, NotImplementedError, TypeError):
            return None
        if not nbytes or ptr in self._buffers:   # chunk memory is counted as a buffer
            return None
        return ptr, nbytes

    def _hold(self, key: tuple[int, int]) -> None:
        ptr, nbytes = key
        with self._lock:
            entry = self._activations.get(ptr)
            if entry is None:
                self._activations[ptr] = [nbytes, 1]
                self._add(nbytes)
            else:
                entry[1] += 1

    def _drop(self, key: tuple[int, int]) -> None:
        with self._lock:
            entry = self._activations.get(key[0])
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del self._activations[key[0]]
                self._allocated -= entry[0]

    def forget_activations(self) -> None:
        with self._lock:
            for nbytes, _ in self._activations.values():
                self._allocated -= nbytes
            self._activations.clear()

    def describe(self) -> dict:
        return {"name": self.name, "device": "sim (host memory)", "max_delay_ms": self.max_delay_s * 1000}

