"""Disk benchmark core: throughput of chunk-sized tensor IO through AsyncFile.

Other benchmarks measure the disk in their own run with these, e.g.

    from hetmem.nvme.bench import measure_mixed
    r = measure_mixed("/nvme/dir", total_bytes=2 << 30, chunk_bytes=64 << 20)
    r["read_bytes_per_s"], r["write_bytes_per_s"], r["total_bytes_per_s"]

The workload is the swap's: whole chunks (one request each, ``inflight_chunks`` of them in
flight per direction) at consecutive offsets of one preallocated file that was written
once before timing (as fio lays its file out), so timed writes overwrite allocated blocks.
Buffers come from an ``IoBufferPool`` (hetmem/nvme/io_pool.py) of the kind the NVMe tier's own
pool is (page-aligned, faulted in, huge pages asked for, locked where RLIMIT_MEMLOCK allows), so
the figures are of the memory training reads into; every result names that kind
(``buffer_kind``).  With O_DIRECT nothing is staged and the page cache plays no part.  On a buffered file (O_DIRECT refused) write timings include an fsync and
the file's cached pages are dropped (posix_fadvise DONTNEED) before each read.
"""
from __future__ import annotations

import os
import statistics
import time
import uuid
from collections import deque
from typing import Callable, Iterable

import torch

from hetmem.nvme.aio import AsyncFile
from hetmem.nvme.io_pool import IoBufferPool, round_up
from hetmem.nvme.config import (DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH, DEFAULT_THREADS, FALLBACK_BACKEND,
                                KERNEL_BACKENDS, IOConfig)

MiB = 1 << 20
Progress = Callable[[str], None]  # called once per measurement, with what was measured


class BenchFile:
    """A scratch file of ``total_bytes`` in ``directory``, preallocated and written once;
    removed on exit."""

    def __init__(self, directory: str, total_bytes: int, chunk_bytes: int):
        if total_bytes < chunk_bytes or total_bytes % chunk_bytes:
            raise ValueError(f"total_bytes={total_bytes} must be a positive multiple of chunk_bytes={chunk_bytes}")
        self.path = os.path.join(directory, f".hetmem-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin")
        self.total_bytes = total_bytes
        self.chunk_bytes = chunk_bytes

    def __enter__(self) -> "BenchFile":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.total_bytes)
        finally:
            os.close(fd)
        try:
            buffers = chunk_buffers(1, self.chunk_bytes)
            measure_sequential(self.path, "write", total_bytes=self.total_bytes, chunk_bytes=self.chunk_bytes,
                               buffers=buffers)
            release_all(buffers)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __exit__(self, *exc) -> None:
        self.remove()


class ChunkBuffers(list):
    """Chunk buffers (uint8 tensors) and ``kind``, the kind of memory they are (IoBufferPool.kind)."""

    kind: str = "caller's"


def chunk_buffers(count: int, chunk_bytes: int, seed: int = 0, *, lock: str = "auto") -> ChunkBuffers:
    """``count`` chunk buffers of random bytes from a fresh IoBufferPool (``lock``: nvme_lock_buffers);
    its memory goes when the last buffer does."""
    pool = IoBufferPool(count * round_up(chunk_bytes), lock=lock)
    g = torch.Generator().manual_seed(seed)
    buffers = ChunkBuffers()
    buffers.kind = pool.kind
    for _ in range(count):
        b = pool.take(chunk_bytes)
        b.copy_(torch.randint(0, 256, (chunk_bytes,), dtype=torch.uint8, generator=g))
        buffers.append(b)
    pool.close()
    return buffers


def release_all(buffers: list[torch.Tensor]) -> None:
    """Drop the list's buffers (a pool's memory goes with its last buffer)."""
    buffers.clear()


def kind_of(buffers) -> str:
    """The buffer kind of ``buffers`` (ChunkBuffers), else "caller's"."""
    return getattr(buffers, "kind", ChunkBuffers.kind)


def drop_cached_pages(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure_sequential(path: str, op: str, *, total_bytes: int, chunk_bytes: int, backend: str = "auto",
                       block_size: int = DEFAULT_BLOCK_SIZE, queue_depth: int = DEFAULT_QUEUE_DEPTH,
                       threads: int = DEFAULT_THREADS, inflight_chunks: int = 2,
                       buffers: list[torch.Tensor] | None = None) -> dict:
    """Write or read ``total_bytes`` of ``path`` chunk by chunk from offset 0; returns
    {"op", "bytes", "seconds", "bytes_per_s", "cpu_seconds", "backend", "direct"}; ``cpu_seconds`` is
    the process's CPU time (all threads, user + system) during the pass."""
    if op not in ("write", "read"):
        raise ValueError(f"op={op!r} must be 'write' or 'read'")
    own = buffers is None
    buffers = chunk_buffers(inflight_chunks if op == "read" else 1, chunk_bytes) if own else buffers
    kind = kind_of(buffers)
    try:
        with AsyncFile(path, backend=backend, block_size=block_size, queue_depth=queue_depth,
                       threads=threads) as f:
            if op == "read" and not f.direct:
                drop_cached_pages(path)
            inflight: deque = deque()
            started, cpu_started = time.perf_counter(), time.process_time()
            for i in range(total_bytes // chunk_bytes):
                if len(inflight) == inflight_chunks:
                    inflight.popleft().wait()
                buf = buffers[i % len(buffers)]
                inflight.append(f.pwrite(buf, i * chunk_bytes) if op == "write" else f.pread(buf, i * chunk_bytes))
            while inflight:
                inflight.popleft().wait()
            if op == "write" and not f.direct:
                drop_cached_pages(path)  # the fsync makes the buffered write reach the disk
            seconds = time.perf_counter() - started
            cpu_seconds = time.process_time() - cpu_started
            backend_used, direct = f.backend, f.direct
    finally:
        if own:
            release_all(buffers)
    return {"op": op, "bytes": total_bytes, "seconds": seconds, "bytes_per_s": total_bytes / seconds,
            "cpu_seconds": cpu_seconds, "backend": backend_used, "direct": direct, "buffer_kind": kind}


def measure_mixed(directory: str, *, total_bytes: int, chunk_bytes: int, backend: str = "auto",
                  block_size: int = DEFAULT_BLOCK_SIZE, queue_depth: int = DEFAULT_QUEUE_DEPTH,
                  threads: int = DEFAULT_THREADS, inflight_chunks: int = 2, path: str | None = None,
                  buffers: list[torch.Tensor] | None = None) -> dict:
    """Reads of one half of a file and writes of the other, in flight at once through one
    AsyncFile (as the swap pipeline reads chunk i+1 while it writes chunk i-1), until
    ``total_bytes`` moved in all.

    ``path``: an existing laid-out file of >= total_bytes (else a scratch file is made in
    ``directory`` and removed).  ``buffers``: at least ``inflight_chunks + 1`` chunk
    buffers to use (reads into the first ones, writes from the last).  Returns {"read_bytes_per_s", "write_bytes_per_s",
    "total_bytes_per_s", "read_bytes", "write_bytes", "seconds", "backend", "direct",
    "block_size", "queue_depth", "threads"}; each rate is that direction's bytes over the
    common elapsed time, so the two add up to the total.
    """
    if path is None:
        with BenchFile(directory, total_bytes, chunk_bytes) as scratch:
            return measure_mixed(directory, total_bytes=total_bytes, chunk_bytes=chunk_bytes, backend=backend,
                                 block_size=block_size, queue_depth=queue_depth, threads=threads,
                                 inflight_chunks=inflight_chunks, path=scratch.path)
    region_chunks = max(1, total_bytes // chunk_bytes // 2)
    write_base = region_chunks * chunk_bytes
    own = buffers is None
    if own:
        buffers = chunk_buffers(inflight_chunks + 1, chunk_bytes, seed=1)
    elif len(buffers) < inflight_chunks + 1:
        raise ValueError(f"measure_mixed needs {inflight_chunks + 1} buffers, got {len(buffers)}")
    kind = kind_of(buffers)
    read_buffers, write_buffers = buffers[:inflight_chunks], buffers[-1:]
    moved = {"read": 0, "write": 0}
    try:
        with AsyncFile(path, backend=backend, block_size=block_size, queue_depth=queue_depth,
                       threads=threads) as f:
            if not f.direct:
                drop_cached_pages(path)
            inflight = {"read": deque(), "write": deque()}  # (issue number, request), oldest first
            issued = {"read": 0, "write": 0}

            def issue(direction: str) -> None:
                i = issued[direction]
                offset = (i % region_chunks) * chunk_bytes
                if direction == "read":
                    req = f.pread(read_buffers[i % inflight_chunks], offset)
                else:
                    req = f.pwrite(write_buffers[0], write_base + offset)
                inflight[direction].append((issued["read"] + issued["write"], req))
                issued[direction] += 1

            started = time.perf_counter()
            for direction in ("read", "write"):
                for _ in range(inflight_chunks):
                    issue(direction)
            budget = total_bytes // chunk_bytes
            while inflight["read"] or inflight["write"]:
                # Refill every direction whose oldest request is done; else block on the
                # request issued first (the likeliest to finish first).
                ready = [d for d in ("read", "write") if inflight[d] and inflight[d][0][1].done()]
                if not ready:
                    ready = [min((d for d in ("read", "write") if inflight[d]), key=lambda d: inflight[d][0][0])]
                for direction in ready:
                    inflight[direction].popleft()[1].wait()
                    moved[direction] += chunk_bytes
                    if issued["read"] + issued["write"] < budget:
                        issue(direction)
            if not f.direct:
                drop_cached_pages(path)
            seconds = time.perf_counter() - started
            backend_used, direct = f.backend, f.direct
    finally:
        if own:
            release_all(buffers)
    return {"read_bytes_per_s": moved["read"] / seconds, "write_bytes_per_s": moved["write"] / seconds,
            "total_bytes_per_s": (moved["read"] + moved["write"]) / seconds, "read_bytes": moved["read"],
            "write_bytes": moved["write"], "seconds": seconds, "backend": backend_used, "direct": direct,
            "block_size": block_size, "queue_depth": queue_depth, "threads": threads, "buffer_kind": kind}


def measure_buffered_baseline(path: str, *, total_bytes: int, chunk_bytes: int) -> dict:
    """Plain single-threaded buffered ``os.pwrite`` (plus fsync) and ``os.preadv`` of whole
    chunks, the file's cached pages dropped (posix_fadvise) before the read."""
    buffers = chunk_buffers(1, chunk_bytes, seed=3)
    buf = buffers[0]
    view = memoryview(buf.numpy())
    n = total_bytes // chunk_bytes
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            started = time.perf_counter()
            for i in range(n):
                done = 0
                while done < chunk_bytes:
                    done += os.pwrite(fd, view[done:], i * chunk_bytes + done)
            os.fsync(fd)
            write_seconds = time.perf_counter() - started
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            started = time.perf_counter()
            for i in range(n):
                done = 0
                while done < chunk_bytes:
                    got = os.preadv(fd, [view[done:]], i * chunk_bytes + done)
                    if got == 0:
                        raise OSError(f"short read in the baseline at {i * chunk_bytes + done}")
                    done += got
            read_seconds = time.perf_counter() - started
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    finally:
        del view, buf
        release_all(buffers)
    return {"write_bytes_per_s": total_bytes / write_seconds, "read_bytes_per_s": total_bytes / read_seconds,
            "write_seconds": write_seconds, "read_seconds": read_seconds, "buffer_kind": buffers.kind}


def measure_checksum(chunk_bytes: int = 64 * MiB, repeats: int = 5) -> dict:
    """Speed of the blob checksum SwapSpace uses (one thread), median of ``repeats``."""
    from hetmem.nvme.checksum import blob_checksum
    from hetmem.nvme._op import aio_op

    name, fn = blob_checksum()
    buffers = chunk_buffers(1, chunk_bytes, seed=4)
    try:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn(buffers[0].data_ptr(), chunk_bytes)
            times.append(time.perf_counter() - started)
    finally:
        release_all(buffers)
    op = aio_op()
    return {"algorithm": name, "implementation": op.crc32c_implementation() if op is not None else "zlib",
            "bytes_per_s": chunk_bytes / statistics.median(times)}


def measure_swap(directory: str, *, total_bytes: int, chunk_bytes: int, checksum: bool, backend: str = "auto",
                 block_size: int = DEFAULT_BLOCK_SIZE, queue_depth: int = DEFAULT_QUEUE_DEPTH,
                 threads: int = DEFAULT_THREADS, inflight_chunks: int = 2) -> dict:
    """Store then load ``total_bytes`` of chunk blobs through a SwapSpace (checksum on or
    off); {"store_bytes_per_s", "load_bytes_per_s", "first_store_bytes_per_s", "buffer_kind"}.  One untimed store pass comes first:
    the first write to preallocated (unwritten) extents costs about twice as much on ext4,
    and a training run pays it only in its first step.  The swap files are removed."""
    from hetmem.nvme.swap import SwapSpace

    n = total_bytes // chunk_bytes
    keys = [f"bench/{i}" for i in range(n)]
    buffers = chunk_buffers(inflight_chunks, chunk_bytes, seed=5)
    rates = {"buffer_kind": buffers.kind}
    try:
        with SwapSpace(directory, {k: chunk_bytes for k in keys}, name=f"hetmem-bench-{os.getpid()}",
                       backend=backend, block_size=block_size, queue_depth=queue_depth, threads=threads,
                       checksum=checksum) as swap:
            for phase in ("first store", "store", "load"):
                inflight: deque = deque()
                started = time.perf_counter()
                for i, key in enumerate(keys):
                    if len(inflight) == inflight_chunks:
                        inflight.popleft().wait()
                    buf = buffers[i % inflight_chunks]
                    inflight.append(swap.load(key, buf) if phase == "load" else swap.store(key, buf))
                while inflight:
                    inflight.popleft().wait()
                rates[f"{phase.replace(' ', '_')}_bytes_per_s"] = total_bytes / (time.perf_counter() - started)
    finally:
        release_all(buffers)
    return rates


def _median(values: list[float]) -> float:
    return statistics.median(values)


def run_sweep(directory: str, *, total_bytes: int = 2 << 30, chunk_bytes: int = 64 * MiB,
              backends: Iterable[str] | None = None, block_sizes: Iterable[int] = (MiB, 4 * MiB, 8 * MiB),
              queue_depths: Iterable[int] = (1, 4, 16, 32), threads: Iterable[int] = (1, 2),
              confirm_top: int = 3, confirm_repeats: int = 2, progress: Progress | None = None) -> dict:
    """The swap benchmark in one run: baseline, sweep, confirmation of the best, mixed runs.

    Every setting is written then read once (``total_bytes`` each way); the ``confirm_top``
    best per direction are measured ``confirm_repeats`` more times and ranked by their
    median.  The mixed run is done with the best write and the best read setting; the
    recommended setting (for ``--write-config``) is the one with the higher mixed total.
    """
    from hetmem.nvme.probe import probe_io

    probe = probe_io(directory)
    backends = [b for b in (backends or KERNEL_BACKENDS) if probe.get(b) == "ok"]
    if not backends:  # the aio op cannot run here: measure what hetmem would use instead
        backends = [FALLBACK_BACKEND]
    grid = [(b, t, bs, qd) for b in backends for t in threads for bs in block_sizes for qd in queue_depths]
    note = progress or (lambda label: None)
    results: list[dict] = []
    with BenchFile(directory, total_bytes, chunk_bytes) as bench:
        baseline = measure_buffered_baseline(bench.path, total_bytes=total_bytes, chunk_bytes=chunk_bytes)
        note("baseline: buffered pwrite/pread")
        buffers = chunk_buffers(2, chunk_bytes)
        kind = buffers.kind
        try:
            seen_direct = []
            cpu: dict[tuple, list[float]] = {}

            def run(setting: dict, op: str) -> float:
                r = measure_sequential(bench.path, op, total_bytes=total_bytes, chunk_bytes=chunk_bytes,
                                       buffers=buffers, **setting)
                seen_direct.append(r["direct"])
                cpu.setdefault(tuple(setting.values()), []).append(r["cpu_seconds"] / (total_bytes / 1e9))
                return r["bytes_per_s"]

            for backend, t, bs, qd in grid:
                setting = {"backend": backend, "block_size": bs, "queue_depth": qd, "threads": t}
                entry = {**setting, "write": [run(setting, "write")], "read": [run(setting, "read")]}
                entry["cpu_seconds_per_gb"] = cpu[tuple(setting.values())]
                results.append(entry)
                note(f"{backend} threads={t} block={bs // MiB}MiB qd={qd}")
            best = {}
            for op in ("write", "read"):
                finalists = sorted(results, key=lambda e: -_median(e[op]))[:max(1, confirm_top)]
                for entry in finalists:
                    setting = {k: entry[k] for k in ("backend", "block_size", "queue_depth", "threads")}
                    for _ in range(confirm_repeats):
                        entry[op].append(run(setting, op))
                    note(f"confirm {op}: {entry['backend']} block={entry['block_size'] // MiB}MiB "
                         f"qd={entry['queue_depth']} threads={entry['threads']}")
                best[op] = max(finalists, key=lambda e: _median(e[op]))  # among the re-measured only
            direct = all(seen_direct)
        finally:
            release_all(buffers)
        mixed = []
        for op in ("write", "read"):
            setting = {k: best[op][k] for k in ("backend", "block_size", "queue_depth", "threads")}
            if any(all(m[k] == v for k, v in setting.items()) for m in mixed):
                continue
            m = measure_mixed(directory, total_bytes=total_bytes, chunk_bytes=chunk_bytes, path=bench.path, **setting)
            mixed.append({**m, "backend": setting["backend"], "best_for": op})
            note(f"mixed read+write with the best {op} setting")
    for entry in results:
        entry["write_median"] = _median(entry["write"])
        entry["read_median"] = _median(entry["read"])
        entry["cpu_seconds_per_gb"] = _median(entry["cpu_seconds_per_gb"])
    chosen = max(mixed, key=lambda m: m["total_bytes_per_s"])
    recommended = IOConfig(backend=chosen["backend"] if chosen["backend"] in KERNEL_BACKENDS else "auto",
                           block_size=chosen["block_size"],
                           queue_depth=chosen["queue_depth"], threads=chosen["threads"])
    return {
        "directory": directory, "total_bytes": total_bytes, "chunk_bytes": chunk_bytes, "o_direct": direct,
        "buffer_kind": kind,
        "probe": probe, "baseline": baseline, "results": results,
        "best": {op: {k: best[op][k] for k in ("backend", "block_size", "queue_depth", "threads")}
                 | {"bytes_per_s": _median(best[op][op]), "samples": len(best[op][op])} for op in best},
        "mixed": mixed, "recommended": recommended.to_dict(),
        "small_block_ratio": small_block_ratio(results),
    }


def small_block_ratio(results: list[dict]) -> dict:
    """Per backend and direction (1 thread): 1 MiB at queue depth 32 over the best 8 MiB figure."""
    ratios: dict[str, dict[str, float]] = {}
    for backend in sorted({e["backend"] for e in results}):
        for op in ("write", "read"):
            small = [e for e in results if e["backend"] == backend and e["threads"] == 1
                     and e["block_size"] == MiB and e["queue_depth"] == 32]
            large = [e for e in results if e["backend"] == backend and e["threads"] == 1 and e["block_size"] == 8 * MiB]
            if small and large:
                ratios.setdefault(backend, {})[op] = (_median(small[0][op])
                                                      / max(_median(e[op]) for e in large))
    return ratios
