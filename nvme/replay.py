"""The disk's time for a workload's own IO: record a swap space's requests, replay them alone.

A generic disk figure (``bench.measure_mixed``: two reads and two writes of one size in flight)
is not what a training step asks of the disk: the step issues loads and stores of several sizes
in its own order, with as many in flight as its pipeline allows.  So:

    with swap.recording() as rec:            # SwapSpace.recording()
        engine.step()
    disk = replay(rec.records, folder, backend=..., block_size=..., queue_depth=..., threads=...)
    disk["seconds"]                          # the step's disk time: its requests, nothing else

``replay`` issues the recorded requests in their order, at their offsets, into a scratch file laid
out like the swap file in ``folder`` (written once before timing, so reads read allocated blocks,
as the swap's do), through an ``AsyncFile`` with the given settings and buffers of the kind an
``IoBufferPool`` with ``lock`` hands out, keeping at most ``inflight`` requests in flight (at least
the most the recording saw).  No compute, no waiting on anything but the disk: as fast as the disk
allows that pattern.  A workload's bytes over its wall time, divided by the replay's rate, is the
share of the disk it reached (<= ~100% by construction, up to noise).
"""
from __future__ import annotations

import errno
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass

import torch

from hetmem._core.units import format_bytes
from hetmem.nvme.aio import AsyncFile
from hetmem.nvme.bench import drop_cached_pages
from hetmem.nvme.io_pool import IoBufferPool, round_up

OPS = ("read", "write")


@dataclass(frozen=True)
class IoRecord:
    """One request a swap space issued."""

    op: str         # "read" (a load) | "write" (a store)
    key: str        # the blob
    offset: int     # file offset
    nbytes: int     # bytes the request moves (the blob's size, or its whole aligned slot)
    inflight: int   # requests of the recording in flight when it was issued, itself included
    issued_s: float  # seconds since the recording started


class IoRecorder:
    """Records the requests a swap space issues while it is active (a context manager).

    ``idle_poll_s``: also measure ``idle_s``, the time nothing of the recording was in flight
    (the disk idle for this workload), by a thread that polls the requests' status every
    ``idle_poll_s`` seconds (a diagnostic: it takes the GIL that often)."""

    def __init__(self, swap, idle_poll_s: float | None = None):
        if idle_poll_s is not None and not idle_poll_s > 0:
            raise ValueError(f"idle_poll_s={idle_poll_s!r} must be > 0 seconds (or None: no polling)")
        self._swap = swap
        self.records: list[IoRecord] = []  # in issue order
        self.elapsed_s = 0.0               # the recording's length
        self.idle_s: float | None = None   # with idle_poll_s: seconds with nothing in flight
        self._outstanding: list = []       # the recording's requests possibly still in flight
        self._started = 0.0
        self._poll_s = idle_poll_s
        self._poller: threading.Thread | None = None
        self._halt = threading.Event()

    def __enter__(self) -> "IoRecorder":
        if self._swap._recorder is not None:
            raise ValueError(f"swap space {self._swap.path} is already recording; nest no recordings")
        self._started = time.perf_counter()
        self._swap._recorder = self
        if self._poll_s is not None:
            self.idle_s = 0.0
            self._poller = threading.Thread(target=self._poll_idle, name="hetmem-swap-idle-poll", daemon=True)
            self._poller.start()
        return self

    def __exit__(self, *exc) -> None:
        self._swap._recorder = None
        if self._poller is not None:
            self._halt.set()
            self._poller.join()
        self.elapsed_s = time.perf_counter() - self._started
        self._outstanding = []

    def _poll_idle(self) -> None:
        last = self._started
        while not self._halt.is_set():
            now = time.perf_counter()
            if not any(not _landed(r) for r in list(self._outstanding)):
                self.idle_s += now - last
            last = now
            time.sleep(self._poll_s)

    def add(self, op: str, key: str, offset: int, nbytes: int, request) -> None:
        """Note a request just issued (``request``: its object, to count what is in flight)."""
        self._outstanding = [r for r in self._outstanding if not r.done()]  # done() never blocks
        self._outstanding.append(request)
        self.records.append(IoRecord(op, key, offset, nbytes, len(self._outstanding),
                                     time.perf_counter() - self._started))

    def bytes(self, op: str | None = None) -> int:
        return sum(r.nbytes for r in self.records if op is None or r.op == op)


def _landed(request) -> bool:
    """Whether a swap request's IO finished (its completion may still be running); never blocks and
    never runs the completion."""
    io = getattr(request, "io", request)  # a StoreRequest's write
    if io._finished:
        return True
    try:
        return bool(io.file._engine.poll(io._id)[0])
    except (IndexError, KeyError):  # the engine forgot it: finished
        return True


def _check_records(records: list[IoRecord]) -> None:
    if not records:
        raise ValueError("replay needs at least one recorded request; the recording saw none (was the swap "
                         "space used inside `with swap.recording()`?)")
    for r in records:
        if r.op not in OPS or r.nbytes <= 0 or r.offset < 0:
            raise ValueError(f"recorded request {r} is not a read or write of > 0 bytes at an offset >= 0")


def _check_folder(directory: str, needed: int) -> None:
    from hetmem.nvme.swap import free_bytes  # (swap imports this module)

    if not os.path.isdir(directory):
        raise ValueError(f"replay folder {directory!r} is not an existing folder; give the folder of the swap "
                         f"space (the disk to measure)")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"replay folder {directory!r} is not writable by this process; give a folder on the "
                         f"same disk that is")
    free = free_bytes(directory)
    if needed > free:
        raise OSError(errno.ENOSPC, f"replaying the recorded requests needs a scratch file of {needed} B "
                                    f"({format_bytes(needed)}) in {directory} but only {free} B "
                                    f"({format_bytes(free)}) are free; free space there or replay fewer requests",
                      directory)


def _lay_out(f: AsyncFile, records: list[IoRecord], buffer: torch.Tensor) -> None:
    """Write every region the replay reads once, so its reads meet allocated, written blocks."""
    regions = sorted({(r.offset, r.nbytes) for r in records if r.op == "read"})
    for offset, nbytes in regions:
        f.submit(True, buffer, offset, nbytes=nbytes).wait()
    if not f.direct:
        drop_cached_pages(f.path)  # buffered: reads must come from the disk, not the page cache


def replay(records: list[IoRecord], directory: str, *, backend: str, block_size: int | str, queue_depth: int,
           threads: int, direct: bool = True, lock: str = "auto", inflight: int | None = None) -> dict:
    """Time ``records`` replayed alone (see the module docstring).  Returns {"seconds", "bytes",
    "read_bytes", "write_bytes", "requests", "bytes_per_s", "inflight", "buffer_kind", "backend",
    "direct"}; ``bytes`` are the bytes the requests moved, every one checked."""
    records = list(records)
    _check_records(records)
    recorded_inflight = max(r.inflight for r in records)
    limit = recorded_inflight if inflight is None else inflight
    if limit < recorded_inflight:
        raise ValueError(f"inflight={inflight} is below the {recorded_inflight} requests the recording had in "
                         f"flight; replay with at least as many")
    size = round_up(max(r.offset + r.nbytes for r in records))
    _check_folder(directory, size)
    largest = max(r.nbytes for r in records)
    count = min(limit, len(records))
    pool = IoBufferPool(count * round_up(largest), lock=lock)
    buffers = [pool.take(largest) for _ in range(count)]  # uint8, ``largest`` bytes each
    generator = torch.Generator().manual_seed(0)
    for b in buffers:  # random bytes: a disk that compresses or skips zeros must not look faster
        b.copy_(torch.randint(0, 256, (largest,), dtype=torch.uint8, generator=generator))
    path = os.path.join(directory, f".hetmem-replay-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin")
    moved = {op: 0 for op in OPS}
    try:
        with AsyncFile(path, backend=backend, block_size=block_size, queue_depth=queue_depth, threads=threads,
                       direct=direct) as f:
            _fallocate(path, size)
            _lay_out(f, records, buffers[0])
            pending: deque = deque()  # (record, request), oldest first
            started = time.perf_counter()
            for i, record in enumerate(records):
                if len(pending) == limit:
                    done, req = pending.popleft()
                    req.wait()
                    moved[done.op] += done.nbytes
                buffer = buffers[i % count]
                pending.append((record, f.submit(record.op == "write", buffer, record.offset, nbytes=record.nbytes)))
            while pending:
                done, req = pending.popleft()
                req.wait()
                moved[done.op] += done.nbytes
            if not f.direct:
                drop_cached_pages(path)  # buffered: the fsync makes the writes reach the disk
            seconds = time.perf_counter() - started
            used_backend, used_direct = f.backend, f.direct
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        kind = pool.kind
        del buffers
        pool.close()
    total = moved["read"] + moved["write"]
    return {"seconds": seconds, "bytes": total, "read_bytes": moved["read"], "write_bytes": moved["write"],
            "requests": len(records), "bytes_per_s": total / seconds, "inflight": limit, "buffer_kind": kind,
            "backend": used_backend, "direct": used_direct}


def _fallocate(path: str, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
