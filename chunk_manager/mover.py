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
    """One copy in flight.  Keeps its source alive until the copy has finished."""

    def __init__(self, label: str, nbytes: int, on_done: Callable[["Transfer"], None] | None = None,
                 route: tuple = ()):
        self.label = label                # e.g. "PARAM#3 host->device"
        self.route = route                # (src tier, dst tier) when a chunk moves
        self.nbytes = nbytes
        self.t_issue = time.perf_counter()
        self.t_done: float | None = None  # set when completion is observed
        self.waited_s = 0.0               # time a consumer spent blocked on it
        self._future: concurrent.futures.Future | None = None
        self._event = None                # torch.cuda.Event on CUDA
        self._keepalive: tuple = ()       # tensors that must live until the copy ends
        self._on_done = on_done
        self._finished = False

    def done(self) -> bool:
        if self._finished:
            return True
        if self._future is not None:
            ready = self._future.done()
        elif self._event is not None:
            ready = self._event.query()
        else:
            ready = True
        if ready:
            self._finish()
        return ready

    def wait(self) -> float:
        """Block the host until the copy is complete; returns the seconds blocked."""
        if self._finished:
            return 0.0
        started = time.perf_counter()
        if self._future is not None:
            self._future.result()  # re-raises a failed copy
        elif self._event is not None:
            self._event.synchronize()
        blocked = time.perf_counter() - started
        self.waited_s += blocked
        self._finish()
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
        self._finished = True
        self.t_done = time.perf_counter()
        self._keepalive = ()
        if self._on_done is not None:
            callback, self._on_done = self._on_done, None
            callback(self)


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
