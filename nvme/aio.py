"""AsyncFile and Request: asynchronous reads and writes of CPU tensors to one file.

    with AsyncFile("/nvme/x.bin") as f:
        req = f.pwrite(tensor, offset=0)     # issue
        ...                                  # compute meanwhile
        req.wait()                           # GIL released; raises OSError on failure

Backends (``backend=``): "io_uring", "linux_aio" and "threads" run in the C++ engine
(csrc/aio); "auto" takes the first that works here in the order io_uring, linux_aio,
threads (linux_aio is skipped for buffered files, where it would do the copy inside
io_submit); "python_threads" is the pure-Python fallback, used automatically, with one
warning, when the aio op cannot be built.

Promises: every byte is checked; ``Request.wait()`` raises ``OSError`` (operation, path,
offset, length, bytes moved, errno text) for a failed or short transfer; ``done()`` is True
once the request finished either way.  A request holds its tensor until it is complete.
Any contiguous CPU tensor works: memory, offsets or lengths that O_DIRECT cannot take go
through the engine's aligned staging buffers (use ``aligned_empty`` buffers and aligned
offsets to avoid the copy).  Reading past the end of the file raises OSError (EIO, short
read); a region inside the file that was never written (a hole, or preallocated space)
reads as zeros.
"""
from __future__ import annotations

import errno as errno_module
import logging
import os
import threading
from typing import Callable

import torch

from hetmem.nvme._op import aio_op
from hetmem.nvme.config import (DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH, DEFAULT_THREADS, FALLBACK_BACKEND,
                                check_backend, check_block_size, check_int)
from hetmem.nvme.fallback import PythonThreadFile

logger = logging.getLogger("hetmem.nvme.aio")

FAULT_KINDS = {"error": 1, "short": 2, "partial": 3, "reap_error": 4, "submit_error": 5}
_SWEEP_EVERY = 64  # submissions between sweeps of finished requests nobody polled


def auto_order(direct: bool) -> tuple[str, ...]:
    """Backends "auto" tries, best first."""
    return ("io_uring", "linux_aio", "threads") if direct else ("io_uring", "threads")


def open_engine(path: str, *, backend: str, block_size: int, queue_depth: int, threads: int, direct: bool,
                read_only: bool = False):
    """The engine object (C++ File or PythonThreadFile) for ``path``; raises OSError."""
    op = aio_op() if backend != FALLBACK_BACKEND else None
    if op is None:
        return PythonThreadFile(path, block_size=block_size, queue_depth=queue_depth, threads=threads,
                                read_only=read_only)
    kwargs = dict(block_size=block_size, queue_depth=queue_depth, threads=threads, direct=direct, read_only=read_only)
    if backend != "auto":
        return op.File(path, backend=backend, **kwargs)
    failures = []
    for name in auto_order(direct):
        try:
            handle = op.File(path, backend=name, **kwargs)
        except OSError as exc:
            if exc.filename is not None:  # the file itself could not be opened: no backend helps
                raise
            failures.append(f"{name}: {exc.strerror or exc}")
            continue
        if name == "linux_aio" and not handle.direct:  # buffered: AIO would be synchronous
            handle.close()
            continue
        if failures:
            logger.debug("backend auto picked %s for %s (%s)", name, path, "; ".join(failures))
        return handle
    raise OSError(errno_module.ENOSYS, f"no IO backend works here: {'; '.join(failures)}", path)


def _check_tensor(tensor, what: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{what} must be a CPU tensor, got device {tensor.device}; copy it to a host buffer "
                         f"(hetmem.nvme.aligned_empty) first")
    if not tensor.is_contiguous():
        raise ValueError(f"{what} must be contiguous, got shape {tuple(tensor.shape)} with strides "
                         f"{tuple(tensor.stride())}; call .contiguous() first")


def _check_offset(offset) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset={offset!r} must be an int >= 0")
    return offset


class Request:
    """One read or write in flight: ``done()`` polls, ``wait()`` blocks and raises on failure."""

    __slots__ = ("file", "op", "offset", "nbytes", "_id", "_tensor", "_on_success", "_lock", "_finished",
                 "_error", "_on_worker", "__weakref__")

    def __init__(self, file: "AsyncFile", rid: int, op: str, offset: int, nbytes: int, tensor: torch.Tensor | None,
                 on_success: Callable[[], None] | None):
        self.file = file
        self.op = op              # "pread" | "pwrite"
        self.offset = offset      # file offset of the first byte
        self.nbytes = nbytes      # bytes asked for
        self._id = rid            # engine request id; forgotten by the engine once finished
        self._tensor = tensor     # kept alive until the IO is complete
        self._on_success = on_success  # runs once after a successful IO (e.g. checksum check), in the
                                       # thread that finishes the request (wait, done or settle)
        self._lock = threading.Lock()
        self._finished = False
        self._error: BaseException | None = None
        self._on_worker = False   # settle_on(): a worker thread runs the completion

    def done(self) -> bool:
        """True once the request finished, successfully or not (then ``wait()`` raises)."""
        if self._finished or self._on_worker:
            return self._finished  # (a worker's request: polling never runs its completion here)
        if not self._lock.acquire(blocking=False):
            return False  # another thread is finishing it (e.g. a swap space's checksum worker)
        try:
            if not self._finished:
                try:
                    landed = self.file._engine.poll(self._id)[0]
                except IndexError:  # its status was taken by an interrupted wait (_take_status)
                    landed = True
                if not landed:
                    return False
                self._finish(self._take_status())  # already done: returns at once
        finally:
            self._lock.release()
        return True

    def wait(self) -> None:
        """Block until complete (the GIL is released); raise OSError if it failed or fell short."""
        self._settle()
        if self._error is not None:
            self.file._reported(self)
            raise self._error

    def settle_on(self, submit: Callable[[Callable[[], None]], None]) -> None:
        """Hand the completion to a worker thread: ``submit(job)`` must run ``job`` there; the job
        blocks until the request finished and runs its completion (``on_success``, e.g. a checksum
        check) on the worker, so that whoever waits finds it done.  ``done()`` then only reports
        what the worker finished (it never runs the completion on the polling thread); ``wait()``
        blocks until the worker is through, or finishes the request itself if the worker has not
        begun it (never reporting it done before its completion ran)."""
        self._on_worker = True
        submit(self._settle)

    @property
    def error(self) -> BaseException | None:
        """What ``wait()`` raises: None while in flight or after success."""
        return self._error if self.done() else None

    def _settle(self) -> None:
        """Block until finished, without raising."""
        if not self._finished:
            with self._lock, torch.profiler.record_function(f"hetmem::nvme_wait_{self.op}"):
                if not self._finished:
                    self._finish(self._take_status())

    def _take_status(self) -> tuple:
        """The engine's final status of this request (the engine forgets the request then).  A wait
        broken off between the engine handing the status over and ``_finish`` recording it (Ctrl-C:
        Python raises KeyboardInterrupt as the engine's call returns) leaves the engine with no such
        request: its outcome is unknown, so it counts as failed (EINTR), never as done, and the file
        can still be closed."""
        try:
            return self.file._engine.wait(self._id)
        except IndexError:  # "unknown request id": its status was taken by a wait that was interrupted
            logger.warning("the completion of %r was lost to an interrupted wait; counted as failed", self)
            return (True, errno_module.EINTR, False, 0, self.offset, self.nbytes, 0)

    def _finish(self, status: tuple) -> None:
        _, err, is_short, moved, fail_offset, fail_length, fail_moved = status
        if err:
            self._error = self.file._io_error(self, err, is_short, moved, fail_offset, fail_length, fail_moved)
        elif self._on_success is not None:
            try:
                self._on_success()
            except Exception as exc:  # noqa: BLE001 - handed to whoever waits
                self._error = exc
        self._tensor = None
        self._on_success = None
        self._finished = True
        self.file._finished(self)

    def __repr__(self) -> str:
        state = "failed" if self._error else "done" if self._finished else "in flight"
        return f"<Request {self.op} {self.nbytes} B at {self.offset} of {self.file.path}: {state}>"


class AsyncFile:
    """A file for asynchronous tensor IO.  ``mode``: "rw" (create if missing, never truncate)
    or "r" (read-only, must exist).  See the module docstring for backends and promises."""

    def __init__(self, path: str | os.PathLike, *, mode: str = "rw", backend: str = "auto",
                 block_size: int | str = DEFAULT_BLOCK_SIZE, queue_depth: int = DEFAULT_QUEUE_DEPTH,
                 threads: int = DEFAULT_THREADS, direct: bool = True):
        if mode not in ("rw", "r"):
            raise ValueError(f"mode={mode!r} must be 'rw' (read-write, created if missing) or 'r' (read-only)")
        check_backend(backend)
        self.block_size = check_block_size(block_size)
        self.queue_depth = check_int(queue_depth, key="queue_depth", low=1, high=1024)
        self.threads = check_int(threads, key="threads", low=1, high=64)
        self.path = os.fspath(path)
        self.mode = mode
        self._engine = open_engine(self.path, backend=backend, block_size=self.block_size,
                                   queue_depth=self.queue_depth, threads=self.threads, direct=bool(direct),
                                   read_only=mode == "r")
        self.backend: str = self._engine.backend  # the backend actually running
        self.direct: bool = bool(self._engine.direct)  # O_DIRECT in effect
        if direct and not self.direct and self.backend != FALLBACK_BACKEND:
            logger.warning("O_DIRECT is not available for %s (%s); using buffered IO, whose speed includes "
                           "the page cache", self.path, self._engine.direct_note)
        self._lock = threading.Lock()
        self._inflight: dict[int, Request] = {}     # submitted, not yet seen finished
        self._unreported: list[Request] = []        # failed, and nobody waited for them
        self._submissions = 0
        self._closed = False

    # -- properties ------------------------------------------------------------------------

    @property
    def alignment(self) -> tuple[int, int]:
        """(memory, offset) alignment O_DIRECT needs here; (1, 1) for buffered IO."""
        return int(self._engine.mem_align), int(self._engine.offset_align)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- IO --------------------------------------------------------------------------------

    def pwrite(self, tensor: torch.Tensor, offset: int) -> Request:
        """Write all bytes of ``tensor`` at ``offset``."""
        _check_tensor(tensor, "tensor")
        return self.submit(True, tensor, _check_offset(offset))

    def pread(self, tensor: torch.Tensor, offset: int) -> Request:
        """Fill ``tensor`` with the bytes at ``offset``."""
        _check_tensor(tensor, "tensor")
        return self.submit(False, tensor, _check_offset(offset))

    def submit(self, write: bool, tensor: torch.Tensor, offset: int, *, nbytes: int | None = None,
               on_success: Callable[[], None] | None = None) -> Request:
        """Issue an IO of ``nbytes`` (default: the tensor's) from ``tensor.data_ptr()``.

        For callers that own memory past the tensor's end (``aligned_empty`` padding) and
        want to move it too; ``on_success`` runs once after the IO succeeded and an
        exception it raises is what ``wait()`` raises.  Tensors are not re-checked here.
        """
        if self._closed:
            raise ValueError(f"I/O on closed AsyncFile {self.path}")
        nbytes = tensor.numel() * tensor.element_size() if nbytes is None else nbytes
        rid = self._engine.submit(write, tensor.data_ptr(), nbytes, offset)
        req = Request(self, rid, "pwrite" if write else "pread", offset, nbytes, tensor, on_success)
        with self._lock:
            self._inflight[rid] = req
            self._submissions += 1
            sweep = self._submissions % _SWEEP_EVERY == 0
        if sweep:
            self._sweep()
        return req

    def _sweep(self) -> None:
        """Collect finished requests nobody looked at (their failures stay for close())."""
        with self._lock:
            candidates = list(self._inflight.values())
        for req in candidates:
            req.done()

    def _finished(self, req: Request) -> None:
        with self._lock:
            self._inflight.pop(req._id, None)
            if req._error is not None:
                self._unreported.append(req)

    def _reported(self, req: Request) -> None:
        with self._lock:
            if req in self._unreported:
                self._unreported.remove(req)

    def _io_error(self, req: Request, err: int, is_short: bool, moved: int, fail_offset: int, fail_length: int,
                  fail_moved: int) -> OSError:
        what = (f"short {req.op[1:]}" if is_short else os.strerror(err))
        message = (f"{what} during {req.op} of {req.nbytes} B at offset {req.offset}: the IO at offset "
                   f"{fail_offset} ({fail_length} B) moved {fail_moved} B; {moved} of {req.nbytes} B of the "
                   f"request confirmed ({self.backend}{', O_DIRECT' if self.direct else ''})")
        if is_short and not req.op == "pwrite":
            message += "; reading past the end of the file?"
        return OSError(err, message, self.path)

    def inject_fault(self, kind: str, *, after: int = 0, errno: int = errno_module.EIO, short_by: int = 4096,
                     count: int = 0) -> None:
        """Test hook: after ``after`` more IO completions, make the next one fail.

        ``kind``: "error" (it reports -errno), "short" (``short_by`` fewer bytes, final: the
        request fails short) or "partial" (``short_by`` fewer bytes; the engine resubmits
        the rest and the request succeeds).  One-shot.  "reap_error" (io_uring and linux_aio,
        which have a reaper thread): from now on every wait for completions fails with
        ``errno`` - a persistent kernel error: the IOs in flight and all later ones fail with
        it, and the reaper exits; ``inject_fault("none")`` disarms it.  "submit_error" (io_uring
        and linux_aio; the threads backend has no submit syscall): the next ``count``
        submissions (io_uring_enter / io_submit) fail with ``errno`` before reaching the kernel,
        every one until ``inject_fault("none")`` when ``count`` is 0.  EAGAIN/EBUSY are retried
        for about 1 s, then the requests fail with the errno; any other errno fails them at once.
        """
        if kind == "none":
            self._engine.set_fault(0, 0, errno, short_by)
            return
        if kind not in FAULT_KINDS:
            raise ValueError(f"kind={kind!r} must be one of none, {', '.join(FAULT_KINDS)}")
        if kind in ("reap_error", "submit_error") and self.backend not in ("io_uring", "linux_aio"):
            raise ValueError(f"kind={kind!r} needs a backend with a submit syscall and a reaper thread "
                             f"(io_uring, linux_aio), not {self.backend}")
        if kind == "submit_error":
            if count < 0:
                raise ValueError(f"count={count} must be >= 0 (0: every submission until inject_fault('none'))")
            after = count
        self._engine.set_fault(FAULT_KINDS[kind], after, errno, short_by)

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for every request, close the file, and raise the first failure nobody waited for."""
        if self._closed:
            return
        with self._lock:
            pending = list(self._inflight.values())
        for req in pending:
            req._settle()
        self._closed = True
        self._engine.close()
        with self._lock:
            unreported, self._unreported = self._unreported, []
        if unreported:
            error = unreported[0]._error
            raise OSError(getattr(error, "errno", errno_module.EIO),
                          f"a request nobody waited for failed: {error}", self.path) from error

    def __enter__(self) -> "AsyncFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an exception is already propagating: do not mask it
            self.close()
        except OSError as close_error:
            logger.error("closing %s after an error: %s", self.path, close_error)

    def __repr__(self) -> str:
        return (f"<AsyncFile {self.path} backend={self.backend} direct={self.direct} block_size={self.block_size} "
                f"queue_depth={self.queue_depth} threads={self.threads}>")
