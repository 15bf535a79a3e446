"""IoArena: the one long-lived pool of host memory that NVMe reads and writes go through.

Why: O_DIRECT moves bytes straight between the disk and the buffer, so the kind of memory the
buffer is decides the speed.  On the development VM (``benchmarks/io_buffers.py`` prints the
table) reads into freshly allocated pages ran at about half the speed of reads into memory that
was faulted in, backed by transparent huge pages and locked; allocating per transfer also pays
the page faults again each time.  So the NVMe tier maps ONE region when the engine starts, keeps
it for the whole run, and carves every NVMe-backed chunk's host payload out of it:

- page-aligned (an anonymous ``mmap``), every block starting and ending on a page boundary, so a
  block moves whole with O_DIRECT and no staging copy;
- transparent huge pages asked for (``madvise(MADV_HUGEPAGE)``; the kernel may refuse);
- faulted in: every page touched once at start, so no transfer waits on a page fault;
- locked (``mlock``) where the host memory is not pinned by an accelerator; when
  ``RLIMIT_MEMLOCK`` refuses, ``lock="auto"`` logs one warning with the fix and carries on
  unlocked, ``lock="required"`` raises; ``lock="off"`` does not try;
- pinned through the accelerator seam instead when the compute device has memory of its own
  (``pin=True``: page-locked memory the device copies from asynchronously).

Idle pages can go back to the kernel (``release_idle``): the free ranges' pages are unlocked and
dropped (``MADV_DONTNEED``), and ``take`` faults (and locks) a block's released pages in again before
handing it out, so every transfer still lands in resident memory.  The engine does this at the
start of backward when the compute device is the CPU: its activations and gradients then need
the same RAM the pool keeps resident (hetmem/chunk_manager/nvme_tier.py, ``release_idle``).

Blocks come from a best-fit free list with coalescing (chunks come in a few sizes, tens to
hundreds of blocks).  A block goes back to the pool when the last tensor viewing it dies (a
finalizer on the buffer object under its storage), so a view kept by user code or autograd never
sees its bytes handed out again.  ``take`` returns None when no free range is large enough (full,
or fragmented); the caller decides what then.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import resource
import threading
import weakref

import numpy as np
import torch

logger = logging.getLogger("hetmem.nvme.io_pool")

PAGE = 4096
HUGE_PAGE = 2 << 20  # release_idle drops whole huge pages and take() faults whole ones back
LOCK_MODES = ("auto", "required", "off")
# the properties a buffer kind is named by, joined with "+" (benchmarks print it next to every figure)
PROPERTIES = ("aligned", "prefaulted", "huge", "locked", "pinned")

_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mlock.argtypes = _libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _libc


def round_up(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


def _runs(flags: np.ndarray, value: bool) -> list[tuple[int, int]]:
    """The [start, end) index runs of ``flags`` equal to ``value``."""
    hit = np.concatenate(([False], flags == value, [False]))
    edges = np.flatnonzero(hit[1:] != hit[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def memlock_limit() -> int | None:
    """The soft RLIMIT_MEMLOCK in bytes (None: unlimited)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


class MemlockError(OSError):
    """mlock refused the NVMe IO buffers and ``nvme_lock_buffers="required"``."""


def _lock_advice(nbytes: int) -> str:
    limit = memlock_limit()
    return (f"locking the {nbytes} B NVMe IO buffers failed (RLIMIT_MEMLOCK is "
            f"{'unlimited' if limit is None else f'{limit} B'}); raise the limit to at least "
            f"{-(-nbytes // 1024)} KiB (`ulimit -l {-(-nbytes // 1024)}` or `ulimit -l unlimited` in the shell "
            f"that starts training, LimitMEMLOCK= for a systemd service, --ulimit memlock=-1 for docker), or set "
            f"nvme_lock_buffers='off' to use unlocked buffers without this message")


class IoBufferPool:
    """One aligned host region of ``capacity`` bytes handing out page-aligned blocks; see the module
    docstring."""

    def __init__(self, capacity: int, *, prefault: bool = True, huge: bool = True, lock: str = "auto",
                 pin: bool = False, large: int | None = None):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity={capacity!r} must be a positive number of bytes")
        if lock not in LOCK_MODES:
            raise ValueError(f"nvme_lock_buffers={lock!r} is not a lock mode; use one of {', '.join(LOCK_MODES)}")
        self.capacity = round_up(capacity)        # bytes, fixed for the pool's life
        self.properties = ["aligned"]             # what the memory is (``kind`` joins them)
        if pin:  # page-locked by the accelerator's host allocator: resident and locked already
            raw = torch.empty(self.capacity + PAGE, dtype=torch.uint8, pin_memory=True)
            skip = (-raw.data_ptr()) % PAGE
            self._owner = raw
            self._array = raw[skip:skip + self.capacity].numpy()  # uint8, capacity bytes
            self.properties.append("pinned")
        else:
            # one huge page more than the capacity, so the region can start on a huge-page boundary
            # (release_idle drops whole huge pages; blocks carved from the top are aligned too when
            # the capacity is a multiple of one, as the NVMe tier sizes it)
            self._owner = mmap.mmap(-1, self.capacity + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if huge and hasattr(mmap, "MADV_HUGEPAGE"):
                self._owner.madvise(mmap.MADV_HUGEPAGE)  # before the first touch, or it is too late
            whole = np.frombuffer(self._owner, dtype=np.uint8)
            skip = (-whole.ctypes.data) % HUGE_PAGE
            self._array = whole[skip:skip + self.capacity]  # uint8, capacity bytes (the rest is never touched)
            if prefault:
                self._array.reshape(-1, PAGE)[:, 0] = 0  # one write per page faults every page in
                self.properties.append("prefaulted")
            if huge and hasattr(mmap, "MADV_HUGEPAGE"):
                self.properties.append("huge")
        self.address = self._array.ctypes.data    # of the first byte
        self.lock_mode = lock                     # "required": locked for the whole run (release_idle keeps it)
        if not pin and lock != "off":
            self._lock(lock)
        self._locked = "locked" in self.properties  # the region was locked: release_idle unlocks first
        self._relock = self._locked               # take() re-locks released pages (until refused once)
        self._mutex = threading.Lock()            # finalizers run on any thread
        self._free: list[list[int]] = [[0, self.capacity]]  # [offset, length], sorted, coalesced
        self._live: dict[int, int] = {}           # offset -> length of blocks handed out
        self.in_use = 0                           # bytes in blocks handed out
        self.peak_in_use = 0                      # the most bytes handed out at once
        self.takes = 0                            # blocks handed out, in total
        self.refusals = 0                         # takes no free range could serve (full or fragmented)
        # blocks of at least this many bytes are carved from the top of the region, smaller ones
        # from the bottom, so the two kinds do not interleave (fewer ranges too small for either)
        self.large = large
        self._released = np.zeros(self.capacity // PAGE, dtype=bool)  # pages handed back to the kernel
        self.released_bytes = 0                   # bytes of the region released now
        self.refaulted = 0                        # released bytes faulted in again by take(), in total
        self.releases = 0                         # release_idle() calls that released something

    @property
    def kind(self) -> str:
        """The buffer kind, e.g. "aligned+prefaulted+huge+locked"."""
        return "+".join(self.properties)

    def _lock(self, mode: str) -> None:
        if _lib().mlock(self.address, self.capacity) == 0:
            self.properties.append("locked")  # munmap unlocks when the region goes
            return
        err = ctypes.get_errno()
        message = f"{_lock_advice(self.capacity)} ({errno.errorcode.get(err, err)}: {os.strerror(err)})"
        if mode == "required":
            raise MemlockError(err, message.replace("; raise", " and nvme_lock_buffers='required'; raise", 1))
        _warn_once(message)

    # -- blocks ---------------------------------------------------------------------------

    def take(self, numel: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor | None:
        """A 1-D tensor of ``numel`` elements starting a block of whole pages, or None when no free
        range is large enough."""
        length = round_up(max(numel * dtype.itemsize, 1))
        with self._mutex:
            fits = [entry for entry in self._free if entry[1] >= length and self._array is not None]
            if not fits:
                self.refusals += 1
                return None
            if self.large is not None and length >= self.large:
                entry = fits[-1]                   # the highest range, carved from its end
                offset = entry[0] + entry[1] - length
            else:
                entry = min(fits, key=lambda e: e[1])  # best fit: the big ranges stay whole
                offset = entry[0]
                entry[0] += length
            entry[1] -= length
            if entry[1] == 0:
                self._free.remove(entry)
            self._live[offset] = length
            self.in_use += length
            self.peak_in_use = max(self.peak_in_use, self.in_use)
            self.takes += 1
            if self.released_bytes:
                self._refault(offset, length)
        block = memoryview(self._array[offset:offset + length])  # lives as long as every view of the tensor
        weakref.finalize(block, self._give_back, offset)
        return torch.frombuffer(block, dtype=torch.uint8).view(dtype)[:numel]

    def _refault(self, offset: int, length: int) -> None:
        """Fault (and lock, when the region is locked) the released pages of the huge pages under
        [offset, offset+length) back in, under the mutex: the block is resident before anyone
        transfers into it.  Whole huge pages, as they were released: touching one 4 KiB page of a
        released huge page brings the whole of it back."""
        first = offset // HUGE_PAGE * HUGE_PAGE // PAGE
        stop = min(self.capacity, round_up(offset + length, HUGE_PAGE)) // PAGE
        pages = self._released[first:stop]
        for start, end in _runs(pages, True):
            at, nbytes = (first + start) * PAGE, (end - start) * PAGE
            if self._relock and _lib().mlock(self.address + at, nbytes) == 0:
                self.refaulted += nbytes  # mlock faults the pages in
            else:
                if self._relock:  # refused: this and later refaults go unlocked, and the kind says so
                    err = ctypes.get_errno()
                    self._relock = False
                    self.properties.remove("locked")
                    _warn_once(f"{_lock_advice(self.capacity)} (re-locking {nbytes} B after release_idle: "
                               f"{errno.errorcode.get(err, err)})")
                if "prefaulted" in self.properties or self._locked:  # else pages fault in with use
                    self._array[at:at + nbytes].reshape(-1, PAGE)[:, 0] = 0
                    self.refaulted += nbytes
            pages[start:end] = False
            self.released_bytes -= nbytes

    @property
    def releasable(self) -> bool:
        """Whether ``release_idle`` may release anything: not for a pinned region (the
        accelerator's allocator owns its pages), one locked with ``lock="required"`` (re-locking
        could be refused later) or a closed pool."""
        return "pinned" not in self.properties and self.lock_mode != "required" and self._array is not None

    def release_idle(self, min_bytes: int = HUGE_PAGE) -> int:
        """Hand the pages of every free range back to the kernel (unlock, ``MADV_DONTNEED``): the
        whole huge pages of ranges spanning at least ``min_bytes``.  ``take`` faults them in again.
        Returns the bytes released; 0 when not ``releasable``.  Blocks given back later keep their
        pages: releasing those too (measured for each backward) refaulted about 1 GB per step, and
        with huge pages faulted under ``defrag=madvise`` steps then took 2 to 9 s instead of 3."""
        if not self.releasable:
            return 0
        with self._mutex:
            before = self.released_bytes
            for offset, length in self._free:
                if length >= min_bytes:
                    self._release(offset, length)
            released = self.released_bytes - before
            self.releases += released > 0
        return released

    def _release(self, offset: int, length: int) -> None:
        """Release the whole huge pages of the free range [offset, offset+length) not released yet
        (under the mutex)."""
        begin, end = round_up(offset, HUGE_PAGE), (offset + length) // HUGE_PAGE * HUGE_PAGE
        if end <= begin:
            return
        pages = self._released[begin // PAGE:end // PAGE]
        for start, stop in _runs(pages, False):
            at, nbytes = begin + start * PAGE, (stop - start) * PAGE
            if self._locked:
                _lib().munlock(self.address + at, nbytes)  # MADV_DONTNEED refuses locked pages
            if _lib().madvise(self.address + at, nbytes, mmap.MADV_DONTNEED) != 0:
                err = ctypes.get_errno()
                logger.debug("madvise(MADV_DONTNEED) of %d B of the IO pool failed (%s); kept", nbytes,
                             errno.errorcode.get(err, err))
                if self._relock:
                    _lib().mlock(self.address + at, nbytes)
                continue
            pages[start:stop] = True
            self.released_bytes += nbytes

    def _give_back(self, offset: int) -> None:
        with self._mutex:
            length = self._live.pop(offset)
            self.in_use -= length
            free = self._free
            at = 0
            while at < len(free) and free[at][0] < offset:
                at += 1
            free.insert(at, [offset, length])
            if at + 1 < len(free) and offset + length == free[at + 1][0]:  # merge with the next range
                free[at][1] += free.pop(at + 1)[1]
            if at > 0 and free[at - 1][0] + free[at - 1][1] == offset:     # and with the previous one
                free[at - 1][1] += free.pop(at)[1]

    def owned_bytes(self, tensor: torch.Tensor) -> int | None:
        """The bytes a block owns from ``tensor``'s start when ``tensor`` starts a block handed out; else None."""
        with self._mutex:
            return self._live.get(tensor.data_ptr() - self.address)

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` starts a block of this pool that is handed out."""
        return self.owned_bytes(tensor) is not None

    def run_if_freed(self, tensor: torch.Tensor) -> int:
        """The contiguous free bytes that freeing ``tensor``'s block would leave (its free neighbours
        merged in); 0 when ``tensor`` does not start a block of this pool."""
        offset = tensor.data_ptr() - self.address
        with self._mutex:
            length = self._live.get(offset)
            if length is None:
                return 0
            run = length
            for start, size in self._free:
                if start + size == offset or start == offset + length:
                    run += size
            return run

    def largest_free(self) -> int:
        with self._mutex:
            return max((length for _, length in self._free), default=0)

    def resident_bytes(self) -> int:
        """Bytes of the region in memory now, by mincore(2): the kernel's word, not this pool's
        bookkeeping (the benchmarks' RSS breakdown reads it); the capacity when that cannot be asked."""
        if self._array is None:
            return 0
        vec = np.zeros(self.capacity // PAGE, dtype=np.uint8)
        mincore = getattr(_lib(), "mincore", None)
        if mincore is None or mincore(ctypes.c_void_p(self.address), ctypes.c_size_t(self.capacity),
                                      vec.ctypes.data_as(ctypes.c_void_p)) != 0:
            return self.capacity
        return int(np.count_nonzero(vec & 1)) * PAGE

    def close(self) -> None:
        """Drop the pool's own hold on the region: it is unmapped once no block is viewed any more
        (take() then returns None)."""
        with self._mutex:
            self._free.clear()
        self._array = self._owner = None

    def stats(self) -> dict:
        with self._mutex:
            return {"kind": self.kind, "capacity": self.capacity, "in_use": self.in_use,
                    "peak_in_use": self.peak_in_use, "live_blocks": len(self._live), "takes": self.takes,
                    "refusals": self.refusals, "free_ranges": len(self._free),
                    "released_bytes": self.released_bytes, "refaulted": self.refaulted, "releases": self.releases}

    def __repr__(self) -> str:
        return f"<IoBufferPool {self.kind}: {self.in_use}/{self.capacity} B in {len(self._live)} blocks>"


_lock_warned = False  # the unlocked fallback is said once per process


def _warn_once(message: str) -> None:
    global _lock_warned
    if not _lock_warned:
        _lock_warned = True
        logger.warning("%s; continuing with unlocked buffers", message)
    else:
        logger.debug("%s", message)
