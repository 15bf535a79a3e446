"""Copies between tiers, split into issue and wait.

On CUDA a copy runs on a side stream and the consumer waits on an event (the compute stream
waits without blocking the host); on the CPU a single worker thread does the copies, which
release the GIL.  A ``Transfer`` is the object in flight: hold it, ask ``done()``, ``wait()``.
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Callable

import torch

logger = logging.getLogger("hetmem.chunk_manager.mover")


class Transfer:
    """One copy in flight.  Keeps its source alive until the copy has finished.

    Backed by a CPU future, a CUDA event, or an NVMe request (``hetmem.nvme.Request``).  On
    success ``on_done`` runs once; on failure ``on_error(exc)`` runs once (it puts the chunk
    back where its data still is) and ``wait()`` raises the error.
    """

    def __init__(self, label: str, nbytes: int, on_done: Callable[["Transfer"], None] | None = None,
                 route: tuple = (), on_error: Callable[[BaseException], None] | None = None):
        self.label = label                # e.g. "PARAM#3 host->device"
        self.route = route                # (src tier, dst tier) when a chunk moves
        self.nbytes = nbytes
        self.t_issue = time.perf_counter()
        self.t_done: float | None = None  # set when completion is observed
        self.waited_s = 0.0               # time a consumer spent blocked on it
        self.error: BaseException | None = None  # why it failed, once known
        self._future: concurrent.futures.Future | None = None
        self._event = None                # torch.cuda.Event on CUDA
        self._request = None              # hetmem.nvme.Request for NVMe IO
        self._keepalive: tuple = ()       # tensors that must live until the copy ends
        self._on_done = on_done
        self._on_error = on_error
        self._finished = False

    def done(self) -> bool:
        """True once finished, either way (a failure is then raised by ``wait()``)."""
        if self._finished:
            return True
        if self._future is not None:
            ready = self._future.done()
        elif self._event is not None:
            ready = self._event.query()
        elif self._request is not None:
            ready = self._request.done()
        else:
            ready = True
        if ready:
            self._finish()
        return ready

    def wait(self) -> float:
        """Block the host until the copy is complete; returns the seconds blocked.

        Raises the transfer's error (OSError for IO) if it failed."""
        if not self._finished:
            started = time.perf_counter()
            try:
                if self._future is not None:
                    self._future.result()
                elif self._event is not None:
                    self._event.synchronize()
                elif self._request is not None:
                    self._request.wait()
            except BaseException as exc:  # noqa: BLE001 - recorded, reverted, re-raised below
                self.error = exc
            blocked = time.perf_counter() - started
            self.waited_s += blocked
            self._finish()
        else:
            blocked = 0.0
        if self.error is not None:
            raise self.error
        return blocked

    def wait_on_stream(self, stream) -> None:
        """CUDA: make ``stream`` wait for the copy without blocking the host."""
        if self._event is not None and not self._finished:
            stream.wait_event(self._event)
        else:
            self.wait()

    def _finish(self) -> None:
        if self._finished:
            return
        if self.error is None:
            if self._future is not None and self._future.exception() is not None:
                self.error = self._future.exception()
            elif self._request is not None and self._request.error is not None:
                self.error = self._request.error
                try:  # the failure is this transfer's to report (on_error, wait, poll) from now on:
                    self._request.wait()  # tell the file it was seen, or its close() raises it again
                except OSError:
                    pass
        self._finished = True
        self.t_done = time.perf_counter()
        self._keepalive = ()
        done, self._on_done = self._on_done, None
        failed, self._on_error = self._on_error, None
        if self.error is not None:
            if failed is not None:
                failed(self.error)
        elif done is not None:
            done(self)

    @classmethod
    def for_request(cls, request, label: str, nbytes: int, *, route: tuple, keepalive: tuple,
                    on_done=None, on_error=None) -> "Transfer":
        """A Transfer over an NVMe request (issued by the caller)."""
        transfer = cls(label, nbytes, on_done, route, on_error)
        transfer._request = request
        transfer._keepalive = keepalive
        return transfer


class Mover:
    """Issues copies on a CUDA side stream, or on one worker thread on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pool = None if self._stream is not None else concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="hetmem-mover")

    def copy(self, dst: torch.Tensor, src: torch.Tensor, label: str,
             on_done: Callable[[Transfer], None] | None = None, route: tuple = ()) -> Transfer:
        """Start ``dst.copy_(src)``; the caller must not touch either before ``wait``."""
        transfer = Transfer(label, src.numel() * src.element_size(), on_done, route)
        if self._stream is not None:
            compute = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(compute)  # the source may still be written by queued kernels
            with torch.cuda.stream(self._stream):
                dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            for t in (dst, src):
                if t.is_cuda:
                    t.record_stream(self._stream)  # the allocator must not reuse them before the copy ends
            transfer._event = event
            transfer._keepalive = (dst, src)
        else:
            transfer._future = self._pool.submit(dst.copy_, src)
            transfer._keepalive = (dst, src)
        return transfer

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
