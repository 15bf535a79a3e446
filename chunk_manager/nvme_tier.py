"""The NVMe tier of the chunk manager: one swap-space blob per chunk.

Every chunk gets a blob of its size when the engine starts (so free space is checked and the
file preallocated before training, never mid-run).  A chunk moves host -> NVMe by a store
from its payload and NVMe -> host by a load into its host payload, so O_DIRECT needs no staging
copy.  Those host payloads come from ONE ``IoBufferPool`` (hetmem/nvme/io_pool.py), filled when the
tier starts (the buffers the first host_budget of chunks, in group order, will take) and kept for
the whole run: page-aligned, huge pages asked for, faulted in, locked (``nvme_lock_buffers``) or
pinned by the accelerator.  Its cap is the host bytes chunks may hold (host_budget, at most every
chunk) plus two of the largest chunks of headroom (payloads kept alive by a view past their
chunk's accounting, and a staging buffer for the checkpoint's reads and writes from buffers of
its own), rounded up to whole 2 MiB huge pages.  Past the cap a payload is allocated outside the
pool, logged once and counted (``buffer_stats()["outside_pool"]``).
``nvme_valid`` on a chunk says its blob holds its current bytes: spilling such a chunk writes
nothing.

Shadow blobs (``shadow_kinds``: the chunks a speculative optimizer update writes,
hetmem/speculation.py): such a chunk has two blobs, the committed one and its shadow.  While the
chunk is *speculative* (``begin_speculation``) its stores and loads go to the other blob, so the
committed one keeps the pre-update bytes; ``commit_speculation`` makes the other blob the
committed one, ``end_speculation`` without commit forgets it (the committed blob is current again).
"""
from __future__ import annotations

import errno
import logging
import os

import torch

from hetmem.nvme import SwapSpace, aligned_tensor
from hetmem._core.units import format_bytes
from hetmem.nvme.io_pool import HUGE_PAGE, IoBufferPool, MemlockError, round_up

from .chunk import Chunk
from .spill import spill_key
from .states import Tier

logger = logging.getLogger("hetmem.chunk_manager.nvme_tier")


def blob_key(chunk: Chunk) -> str:
    return f"{chunk.kind.name}#{chunk.group.index}"


def shadow_key(key: str) -> str:
    return key + "~shadow"


# errors opening the swap space that say nvme_dir itself is unusable (a config error)
_DIR_ERRORS = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "it is on a read-only file system", errno.ENOTDIR: "a part of the path is a file",
               errno.EEXIST: "it is a file, not a folder", errno.ENOENT: "the path cannot be reached",
               errno.ELOOP: "the path has a symlink loop", errno.ENAMETOOLONG: "the path is too long"}


def _unusable(directory: str, why: str) -> ValueError:
    return ValueError(f"nvme_dir={directory!r} cannot hold the swap space: {why}; give nvme_dir a folder you can "
                      f"write to on a local (NVMe) drive (it is created if missing), or None to keep the NVMe "
                      f"tier off")


def check_nvme_dir(directory: str) -> None:
    """Create ``directory`` if needed; ValueError naming nvme_dir and the fix if it cannot hold files."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise _unusable(directory, "it is a file, not a folder")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise _unusable(directory, f"creating it failed ({exc.strerror})") from exc
    if os.statvfs(directory).f_flag & os.ST_RDONLY:
        raise _unusable(directory, "it is on a read-only file system")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise _unusable(directory, "this process may not create files in it")


def pool_bytes(chunks: list[Chunk], host_limit: int) -> int:
    """The IO pool's cap: the host bytes chunks may hold (at most all of them, page-padded) and
    two of the largest chunks of headroom, in whole huge pages (so the large payloads carved from
    the region's top start on one too, and ``release_idle`` can drop them whole)."""
    padded = [round_up(c.nbytes) for c in chunks]
    return round_up(min(host_limit, sum(padded)) + 2 * max(padded), HUGE_PAGE)


def large_payload(chunks: list[Chunk]) -> int:
    """Payloads this large or larger (fp32 states, beside half-size low-precision parameters and
    gradients) are kept apart from the smaller ones in the IO pool."""
    return max(round_up(c.nbytes) for c in chunks) // 2 + 1


class NvmeTier:
    def __init__(self, chunks: list[Chunk], directory: str, *, backend: str, block_size: int, queue_depth: int,
                 threads: int, checksum: bool, host_limit: int, lock: str = "auto", pin: bool = False,
                 manager=None, shadow_kinds=()):
        check_nvme_dir(directory)
        # every NVMe-backed host payload, for the whole run (see the module docstring)
        size = pool_bytes(chunks, host_limit)
        try:
            self.pool = IoBufferPool(size, lock=lock, pin=pin, large=large_payload(chunks))
        except (OSError, RuntimeError) as exc:  # mmap / pinned allocation refused (MemlockError passes)
            if isinstance(exc, MemlockError):
                raise
            raise ValueError(f"the NVMe IO buffer pool ({format_bytes(size)}: host_budget="
                             f"{format_bytes(host_limit)}, at most every chunk, plus two of the largest) cannot be "
                             f"allocated ({exc}); lower host_budget so it fits the memory this process may "
                             f"use") from exc
        self.outside_pool = 0  # payloads allocated outside the pool (no range, nothing to spill), in total
        self.spills = 0        # host chunks spilled to make a free range, in total
        self.manager = manager  # the ChunkManager whose host chunks it may spill to defragment the pool
        blobs = {blob_key(c): c.nbytes for c in chunks}
        blobs.update({shadow_key(blob_key(c)): c.nbytes for c in chunks if c.kind in shadow_kinds})
        self.shadow_kinds = frozenset(shadow_kinds)
        self._flipped: set[str] = set()       # keys whose committed blob is the shadow
        self._speculative: set[int] = set()   # ids of chunks whose stores and loads use the other blob
        try:
            self.swap = SwapSpace(directory, blobs, backend=backend,
                                  block_size=block_size, queue_depth=queue_depth, threads=threads,
                                  checksum=checksum, owned_bytes=self.pool.owned_bytes)
        except OSError as exc:
            if exc.errno not in _DIR_ERRORS:
                raise  # no space (the message says how much is needed), in use by another run, ...
            raise _unusable(directory, f"{_DIR_ERRORS[exc.errno]} ({exc})") from exc
        logger.info("NVMe tier: %d chunk blobs, %d bytes in %s (%s); IO buffers: %s", len(chunks),
                    self.swap.nbytes, self.swap.path, self.swap.file.backend, self.pool)

    def host_buffer(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A host payload buffer from the IO pool (aligned, faulted in, locked or pinned).  When no
        free range is large enough (the pool is fragmented: host accounting counts bytes, not
        ranges), the manager's cached free buffers are dropped, then host chunks are spilled (the
        one whose range would close the gap first); a buffer outside the pool is the last resort."""
        nbytes = numel * dtype.itemsize
        buffer = self.pool.take(numel, dtype)
        if buffer is None and self.manager is not None:
            if self.manager.pool.trim(Tier.HOST):  # cached free buffers hold pool ranges
                buffer = self.pool.take(numel, dtype)
            while buffer is None and self._spill_for(nbytes):
                buffer = self.pool.take(numel, dtype)
        if buffer is not None:
            return buffer
        self.outside_pool += 1
        log = logger.warning if self.outside_pool == 1 else logger.debug
        log("the NVMe IO buffer pool (%s) has no free range of %d B and no host chunk can be spilled: this "
            "payload is allocated outside it, as a plain aligned buffer (%d so far)", self.pool, nbytes,
            self.outside_pool)
        return aligned_tensor(numel, dtype)

    def release_idle(self) -> int:
        """Hand the IO pool's idle pages back to the kernel (the manager's cached free host buffers
        first: they hold pool ranges); the pool faults them in again as blocks are taken.  For a
        compute device that shares host RAM, at the start of backward: the pool's free ranges are
        then largest and backward's activations and gradients need the RAM.  Returns the bytes
        released."""
        if not self.pool.releasable:
            return 0
        if self.manager is not None:
            self.manager.pool.trim(Tier.HOST)
        released = self.pool.release_idle()
        if released:
            logger.debug("released %d B of idle IO buffer pages (%d B released in all)", released,
                         self.pool.released_bytes)
        return released

    def _spill_for(self, nbytes: int) -> bool:
        """Free pool ranges towards one of ``nbytes``: wait for a store in flight (its payload is
        freed when it lands: no new IO), else spill a host chunk; False when nothing can go."""
        manager = self.manager
        landing = manager.stores_in_flight()
        if landing:
            manager.wait(landing[0])
        else:
            candidates = [c for c in manager.chunks if manager.can_spill(c) and c.payload is not None
                          and self.pool.owns(c.payload)]
            if not candidates:
                return False
            # a chunk whose range closes the gap first, then the manager's spill order (preferring
            # chunks whose blob is current measured worse: they are the ones read back soonest)
            order = manager.spill_preference or spill_key
            victim = min(candidates, key=lambda c: (self.pool.run_if_freed(c.payload) < nbytes, order(c)))
            self.spills += 1
            manager.move(victim, Tier.NVME, cause="spill")  # to defragment the IO pool (self.spills)
            manager.wait(victim)
        manager.pool.trim(Tier.HOST)  # a landed store's payload went to the manager's free list
        return True

    def store(self, chunk: Chunk, payload: torch.Tensor):
        if not self.pool.owns(payload):  # a caller's buffer (checkpoint load): stage it in the pool
            staged = self.pool.take(payload.numel(), payload.dtype)
            if staged is not None:
                payload = staged.copy_(payload)  # the request holds ``staged`` until it completes
        return self.swap.store(self.key(chunk), payload)

    def load(self, chunk: Chunk, into: torch.Tensor):
        if not self.pool.owns(into):  # a caller's buffer (checkpoint save): read via the pool
            staged = self.pool.take(into.numel(), into.dtype)
            if staged is not None:
                return _CopyOut(self.swap.load(self.key(chunk), into=staged), staged, into)
        return self.swap.load(self.key(chunk), into=into)

    # -- shadow blobs (see the module docstring) ---------------------------------------

    def key(self, chunk: Chunk) -> str:
        """The blob that holds ``chunk``'s bytes now (its committed one, or while speculative the other)."""
        key = blob_key(chunk)
        if (key in self._flipped) != (chunk.id in self._speculative):
            return shadow_key(key)
        return key

    def begin_speculation(self, chunk: Chunk) -> None:
        """From now on ``chunk``'s bytes go to its other blob; the committed one is kept."""
        if chunk.kind not in self.shadow_kinds:
            raise ValueError(f"{chunk.name} has no shadow blob (shadow kinds: "
                             f"{sorted(k.name for k in self.shadow_kinds)})")
        self._speculative.add(chunk.id)

    def commit_speculation(self, chunk: Chunk) -> None:
        """The other blob becomes the committed one (a flag: no IO)."""
        if chunk.id in self._speculative:
            self._speculative.discard(chunk.id)
            self._flipped ^= {blob_key(chunk)}

    def end_speculation(self, chunk: Chunk) -> None:
        """Forget the other blob: the committed one is ``chunk``'s again (the caller discards
        or reloads what memory holds)."""
        self._speculative.discard(chunk.id)

    def speculative(self, chunk: Chunk) -> bool:
        return chunk.id in self._speculative

    def buffer_stats(self) -> dict:
        """The IO pool's figures (kind, cap, bytes mapped and in use, allocations) and the payloads outside it."""
        return {**self.pool.stats(), "outside_pool": self.outside_pool, "defragment_spills": self.spills}

    @property
    def nbytes(self) -> int:
        return self.swap.nbytes

    def close(self) -> None:
        try:
            self.swap.close()
        finally:
            self.pool.close()  # the region goes with the last payload viewing it


class _CopyOut:
    """A load into a pool buffer whose ``wait()`` then copies the bytes to the caller's tensor."""

    def __init__(self, request, staged: torch.Tensor, into: torch.Tensor):
        self._request, self._staged, self._into = request, staged, into

    def wait(self) -> None:
        self._request.wait()
        if self._staged is not None:
            self._into.copy_(self._staged)
            self._staged = None  # the buffer goes back to the pool
