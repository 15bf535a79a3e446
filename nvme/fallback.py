"""The pure-Python IO backend ("python_threads"), used when the aio op cannot be built.

Blocking ``os.preadv``/``os.pwritev`` in a thread pool (the GIL is released inside the
system calls), buffered (no O_DIRECT: no staging logic is needed).  It has the C++
engine's interface and promises: requests cut into ``block_size`` pieces, at most
``queue_depth * threads`` in flight, every result checked, a short transfer or an error
fails the request, test-only fault injection.  It is slower; it exists so that hetmem
keeps working, with a warning, on a machine without a compiler.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger("hetmem.nvme.fallback")

# Fault kinds, as in csrc/aio/engine.h (ReapError = 4 has no counterpart: there is no reaper here).
FAULT_NONE, FAULT_ERROR, FAULT_SHORT, FAULT_PARTIAL = 0, 1, 2, 3


def _errno_of(exc: BaseException) -> int:
    """The errno a worker exception fails its request with (wait() raises OSError with it)."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, OverflowError):  # e.g. an offset past what off_t holds
        return errno.EOVERFLOW
    if isinstance(exc, MemoryError):
        return errno.ENOMEM
    if isinstance(exc, (ValueError, TypeError)):
        return errno.EINVAL
    return errno.EIO


class _Request:
    __slots__ = ("blocks_left", "done", "failed", "status")

    def __init__(self, blocks: int):
        self.blocks_left = blocks
        self.done = blocks == 0
        self.failed = False
        # (done, errno, short, moved, fail_offset, fail_length, fail_moved), as the C++ engine
        self.status = [self.done, 0, False, 0, 0, 0, 0]


def _memory(ptr: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(ptr)).cast("B")


class PythonThreadFile:
    """Same interface as the C++ ``File`` (see hetmem/nvme/aio.py)."""

    backend = "python_threads"
    direct = False
    direct_note = "the pure-Python fallback does buffered IO"
    mem_align = 1
    offset_align = 1

    def __init__(self, path: str, *, block_size: int, queue_depth: int, threads: int, read_only: bool = False):
        flags = (os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT) | os.O_CLOEXEC
        self._fd = os.open(path, flags, 0o644)
        self.block_size = block_size
        self._read_only = read_only
        self._pool = ThreadPoolExecutor(max_workers=queue_depth * threads, thread_name_prefix="hetmem-pyio")
        self._cond = threading.Condition()
        self._requests: dict[int, _Request] = {}
        self._next_id = 1
        self._closed = False
        self._fault = (FAULT_NONE, 0, 0, 0)  # kind, countdown, errno, short_by

    def submit(self, write: bool, ptr: int, nbytes: int, offset: int) -> int:
        if self._closed:
            raise RuntimeError("submit on a closed file")
        if write and self._read_only:
            raise RuntimeError("write to a file opened read-only")
        starts = range(0, nbytes, self.block_size)
        req = _Request(len(starts))
        with self._cond:
            rid = self._next_id
            self._next_id += 1
            self._requests[rid] = req
        for start in starts:
            n = min(self.block_size, nbytes - start)
            self._pool.submit(self._run_block, req, write, ptr + start, n, offset + start)
        return rid

    def _transfer(self, write: bool, ptr: int, nbytes: int, offset: int) -> int:
        """Bytes moved (continuing after partial transfers) or -errno."""
        view = _memory(ptr, nbytes)
        moved = 0
        while moved < nbytes:
            try:
                rest = view[moved:]
                r = os.pwritev(self._fd, [rest], offset + moved) if write else os.preadv(self._fd, [rest], offset + moved)
            except OSError as exc:  # EINTR is retried by Python itself (PEP 475)
                return moved if moved else -(exc.errno or errno.EIO)
            if r == 0:
                break
            moved += r
        return moved

    def _injected(self, result: int) -> tuple[int, bool]:
        """Apply an armed fault to one completion: (result, final)."""
        with self._cond:
            kind, countdown, err, short_by = self._fault
            if kind == FAULT_NONE:
                return result, False
            if countdown > 0:
                self._fault = (kind, countdown - 1, err, short_by)
                return result, False
            self._fault = (FAULT_NONE, 0, 0, 0)
        if kind == FAULT_ERROR:
            return -err, True
        if result > 0:
            return max(0, result - short_by), kind == FAULT_SHORT
        return result, False

    def _run_block(self, req: _Request, write: bool, ptr: int, nbytes: int, offset: int) -> None:
        """One block, run by a pool worker: whatever happens, it completes (an exception
        becomes the request's error; nothing is left for the pool to swallow)."""
        moved = 0
        error, is_short = 0, False
        try:
            while not req.failed:
                result, final = self._injected(self._transfer(write, ptr + moved, nbytes - moved, offset + moved))
                if result < 0:
                    error = -result
                    break
                moved += result
                if moved >= nbytes:
                    break
                if result == 0 or final:
                    error, is_short = errno.EIO, True
                    break
        except BaseException as exc:  # noqa: BLE001 - reported through the request, never lost
            error, is_short = _errno_of(exc), False
            logger.error("IO worker: %s of %d B at offset %d raised %s: %s", "pwrite" if write else "pread",
                         nbytes, offset, type(exc).__name__, exc)
        with self._cond:
            status = req.status
            if error and not req.failed:
                req.failed = True
                status[1:] = [error, is_short, status[3], offset, nbytes, moved]
            elif not req.failed:
                status[3] += nbytes
            req.blocks_left -= 1
            if req.blocks_left == 0:
                req.done = True
                status[0] = True
                self._cond.notify_all()

    def _find(self, rid: int) -> _Request:
        req = self._requests.get(rid)
        if req is None:
            raise IndexError(f"unknown request id {rid}")
        return req

    def poll(self, rid: int) -> tuple:
        with self._cond:
            return tuple(self._find(rid).status)

    def wait(self, rid: int) -> tuple:
        with self._cond:
            req = self._find(rid)
            self._cond.wait_for(lambda: req.done)
            del self._requests[rid]
            return tuple(req.status)

    def set_fault(self, kind: int, after: int = 0, err: int = errno.EIO, short_by: int = 4096) -> None:
        with self._cond:
            self._fault = (kind, after, err, short_by)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        os.close(self._fd)
