"""A swap space's checksums, taken off the thread that issues and waits for the IO.

``SwapSpace(checksum=True)`` keeps a CRC of every blob (hetmem/nvme/swap.py).  Taking it on the
thread that trains put it on the step's critical path (9.6% of a training step measured on the
development VM, README "NVMe tier").  Here two worker threads do it, each releasing the GIL
inside the checksum function:

- **stores**: the "crc" worker takes the checksum of the tensor while its write is in flight
  (both only read the tensor).  The store's request (``StoreRequest``) is done only when the
  write AND the checksum are: the caller may reuse the buffer only after that, and nobody writes
  a tensor whose store is in flight (the chunk manager detaches the payload from its chunk until
  the store lands), so the checksum is of the bytes written.
- **loads**: the "verify" worker settles each load (``Request.settle_on()``: waits for it with
  the GIL released and runs its verifier), so the read is verified right after it lands, while
  the trainer computes; ``wait()`` then finds it done, and polling (``done()``) never verifies on
  the polling thread.  A load the worker has not reached yet is settled, and verified, by
  whoever waits for it first: a corrupted read is never reported done.

The checksum bytes and time go into the swap space's live ``stats`` dict: ``checksum_seconds`` on
any thread, ``checksum_inline_seconds`` the part a waiting thread computed itself.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable

import torch

logger = logging.getLogger("hetmem.nvme.swap_checksum")


class _Worker(threading.Thread):
    """A daemon thread running jobs (callables) in order until stopped; a job that raises is logged."""

    def __init__(self, name: str):
        super().__init__(name=name, daemon=True)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # callables; None stops the thread
        self.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except BaseException:  # noqa: BLE001 - keep serving; the request's waiter finishes it
                logger.exception("a swap checksum job failed on %s", self.name)

    def stop(self) -> None:
        if self.is_alive():
            self._jobs.put(None)
            if threading.current_thread() is not self:
                self.join()


class StoreRequest:
    """A store in flight: its write (``io``, a hetmem.nvme.Request) and the checksum of its bytes
    (``crc``, a Future of an int) taken meanwhile on the crc worker.  Done when both are."""

    __slots__ = ("io", "crc")

    def __init__(self, io, crc: Future):
        self.io = io    # the write request
        self.crc = crc  # resolves to the checksum of the tensor's bytes

    @property
    def op(self) -> str:
        return self.io.op

    @property
    def offset(self) -> int:
        return self.io.offset

    @property
    def nbytes(self) -> int:
        return self.io.nbytes

    def done(self) -> bool:
        """True once the write and the checksum finished (``wait()`` then raises a failure)."""
        return self.crc.done() and self.io.done()

    def wait(self) -> None:
        """Block until both finished; raise the write's OSError (or the checksum's error)."""
        try:
            self.io.wait()
        finally:
            crc_error = self.crc.exception()  # blocks (GIL released) until the worker took it
        if crc_error is not None:
            raise crc_error

    @property
    def error(self) -> BaseException | None:
        """What ``wait()`` raises: None while in flight or after success."""
        if not self.done():
            return None
        return self.io.error or self.crc.exception()

    def __repr__(self) -> str:
        return f"<StoreRequest {self.io!r}, checksum {'taken' if self.crc.done() else 'pending'}>"


class ChecksumWorkers:
    """The crc and verify workers of one swap space; ``fn(ptr, nbytes) -> int`` is the checksum (GIL
    released inside); ``stats``: the swap space's dict, whose checksum_* entries they add to."""

    def __init__(self, fn: Callable[[int, int], int], name: str, stats: dict):
        self._fn = fn
        self._stats_lock = threading.Lock()
        self.stats = stats  # checksum_bytes / _seconds (all threads) / _inline_seconds (waiting threads)
        self._crc = _Worker(f"hetmem-swap-crc-{name}")
        self._verify = _Worker(f"hetmem-swap-verify-{name}")

    def checksum(self, tensor: torch.Tensor, nbytes: int) -> int:
        """The checksum of ``tensor``'s first ``nbytes`` bytes, counted in ``stats``."""
        started = time.perf_counter()
        value = self._fn(tensor.data_ptr(), nbytes)
        seconds = time.perf_counter() - started
        on_worker = threading.current_thread() in (self._crc, self._verify)
        with self._stats_lock:
            self.stats["checksum_bytes"] += nbytes
            self.stats["checksum_seconds"] += seconds
            if not on_worker:
                self.stats["checksum_inline_seconds"] += seconds
        return value

    def take(self, tensor: torch.Tensor, nbytes: int) -> Future:
        """Start the checksum of a tensor being stored; the Future keeps the tensor until it is taken."""
        future: Future = Future()

        def job() -> None:
            try:
                future.set_result(self.checksum(tensor, nbytes))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the store
                logger.error("checksum of a swap store failed: %s", exc)
                future.set_exception(exc)

        self._crc.submit(job)
        return future

    def settle(self, request) -> None:
        """Have the verify worker wait for a load and run its verifier as soon as it lands."""
        request.settle_on(self._verify.submit)

    def stop(self) -> None:
        """Stop both workers after the jobs already given (call once no IO is in flight)."""
        self._crc.stop()
        self._verify.stop()
