"""Copies between tiers, split into issue and wait.

The accelerator seam (hetmem/accelerator/) runs each copy asynchronously: on a GPU on a
side stream, where the consumer's stream waits on an event without blocking the host; on the
CPU on one worker thread (copies release the GIL); on the simulated test device on a copy
thread that lands late.  A ``Transfer`` is the object in flight: hold it, ask ``done()``
(a pure query), ``poll()`` it (runs its completion once it has landed) or ``wait()``.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from hetmem.accelerator import Accelerator

logger = logging.getLogger("hetmem.chunk_manager.mover")


class Transfer:
    """One copy in flight.  Keeps its source alive until the copy has finished.

    Backed by a copy event from the accelerator seam or an NVMe request
    (``hetmem.nvme.Request``).  Its completion runs once, from ``poll()`` or ``wait()`` and
    never from ``done()``: on success ``on_done``, on failure ``on_error(exc)`` (it puts the
    chunk back where its data still is), and ``wait()`` raises the error.
    """

    def __init__(self, label: str, nbytes: int, on_done: Callable[["Transfer"], None] | None = None,
                 route: tuple = (), on_error: Callable[[BaseException], None] | None = None):
        self.label = label                # e.g. "PARAM#3 host->device"
        self.route = route                # (src tier, dst tier) when a chunk moves
        self.nbytes = nbytes
        self.t_issue = time.perf_counter()
        self.t_done: float | None = None  # set when completion is processed
        self.waited_s = 0.0               # time a consumer spent blocked on it
        self.error: BaseException | None = None  # why it failed, once known
        self._event = None                # the accelerator's copy event
        self._request = None              # hetmem.nvme.Request for NVMe IO
        self._keepalive: tuple = ()       # tensors that must live until the copy ends
        self._on_done = on_done
        self._on_error = on_error
        self._finished = False            # completion processed

    def done(self) -> bool:
        """True once the copy has landed, either way (a failure is then raised by ``wait()``).

        A query: it changes nothing; ``poll()`` processes the completion."""
        if self._finished:
            return True
        if self._event is not None:
            return self._event.query()
        if self._request is not None:
            return self._request.done()
        return True

    def poll(self) -> bool:
        """Process the completion if the copy has landed; True once finished."""
        if not self._finished and self.done():
            try:  # landed: each returns at once, or raises the copy's error (and so reports it)
                if self._event is not None:
                    self._event.synchronize()
                elif self._request is not None:
                    self._request.wait()
            except BaseException as exc:  # noqa: BLE001 - recorded and handed to on_error
                self.error = exc
            self._finish()
        return self._finished

    def wait(self) -> float:
        """Block the host until the copy is complete; returns the seconds blocked.

        Raises the transfer's error (OSError for IO) if it failed."""
        if not self._finished:
            started = time.perf_counter()
            try:
                if self._event is not None:
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

    def wait_for_compute(self, accelerator: Accelerator) -> float:
        """Make the compute that follows see the copy: on a GPU the compute stream waits without
        blocking the host (completion is processed by a later ``poll``); where the host computes,
        the host waits.  Returns the seconds the host blocked."""
        if self._event is not None and not self._finished:
            blocked = accelerator.compute_waits(self._event)
            self.waited_s += blocked
            return blocked
        return self.wait()

    def _finish(self) -> None:
        if self._finished:
            return
        if self.error is None and self._request is not None and self._request.error is not None:
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
    """Issues copies on one copy stream of the accelerator."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self._stream = accelerator.copy_stream()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, label: str,
             on_done: Callable[[Transfer], None] | None = None, route: tuple = (),
             keepalive: tuple = ()) -> Transfer:
        """Start ``dst.copy_(src)``; the caller must not touch either before ``wait``."""
        transfer = Transfer(label, src.numel() * src.element_size(), on_done, route)
        transfer._event = self.accelerator.copy_async(dst, src, self._stream, label)
        transfer._keepalive = (dst, src) + keepalive
        return transfer

    def close(self) -> None:
        self.accelerator.close_stream(self._stream)
