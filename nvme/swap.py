"""SwapSpace: named fixed-size blobs (chunk payloads) in one preallocated file under a folder.

    swap = SwapSpace("/nvme/run", {"PARAM/0": n0, "PARAM/1": n1}, checksum=True)
    w = swap.store("PARAM/0", buf0)          # async; returns a Request
    r = swap.load("PARAM/1", into=buf1)      # async; may be in flight with w
    w.wait(); r.wait()                        # r.wait() verifies the checksum
    swap.close()                              # waits, then removes the swap files

Rules:
- Blob sizes are declared up front (constructor or ``reserve()``).  Before a byte is
  written the free space is checked (OSError ENOSPC naming the bytes needed, the bytes
  free and the folder), then the file is preallocated (posix_fallocate: fallocate(2),
  emulated only where the file system lacks it).  Each blob starts on a 4096-byte
  boundary (or the file system block, if larger) and owns its slot up to the next one, so
  ``aligned_empty`` buffers move whole with O_DIRECT and no staging.
- ``<name>.swap.lock`` marks the folder in use: it holds the pid and an exclusive flock
  for the swap space's life.  A second swap space with the same name in the same folder
  is refused (EBUSY).  A lock file nobody holds is left by a run that died: its swap file
  is stale and is removed (logged) before this one starts.
- ``load`` of a key never stored, whose store is still in flight, or whose last store
  failed raises ValueError; ``store`` while a load or store of that key is in flight
  raises ValueError (order them with ``wait()``).
- ``checksum=True`` takes a CRC-32C (C++) of each blob at ``store`` and checks it when a
  ``load`` completes; a mismatch makes ``wait()`` raise ``SwapChecksumError``.  Both run on
  worker threads, off the caller's (hetmem/nvme/swap_checksum.py): a store's request is done
  once its write and its checksum are, a load's once it is verified.  Off by default;
  ``stats`` reports its cost (``checksum_inline_seconds``: the part a waiting thread computed).
- ``recording()`` records the requests issued meanwhile (hetmem/nvme/replay.py), to replay
  them on their own and time the disk under the same pattern.
"""
from __future__ import annotations

import enum
import errno
import fcntl
import logging
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from hetmem.nvme.aio import AsyncFile, Request, _check_tensor
from hetmem.nvme.buffers import padded_nbytes
from hetmem.nvme.checksum import blob_checksum
from hetmem.nvme.replay import IoRecorder
from hetmem.nvme.swap_checksum import ChecksumWorkers, StoreRequest
from hetmem.nvme.config import DEFAULT_BACKEND, DEFAULT_BLOCK_SIZE, DEFAULT_QUEUE_DEPTH, DEFAULT_THREADS
from hetmem._core.units import format_bytes

logger = logging.getLogger("hetmem.nvme.swap")

SLOT_ALIGNMENT = 4096


class SwapChecksumError(OSError):
    """A blob read back does not match the checksum taken when it was stored."""

    def __init__(self, key: str, path: str, offset: int, nbytes: int, expected: int, actual: int, algorithm: str):
        super().__init__(errno.EIO, f"{algorithm} mismatch for swap blob {key!r} ({nbytes} B at offset {offset}): "
                                    f"stored {expected:#010x}, read back {actual:#010x}; the swap file was "
                                    f"corrupted or changed on disk", path)
        self.key = key
        self.offset = offset
        self.nbytes = nbytes
        self.expected = expected
        self.actual = actual


class BlobState(enum.Enum):
    EMPTY = "never stored"
    WRITING = "a store is in flight"
    STORED = "stored"
    FAILED = "the last store failed"


@dataclass
class _Blob:
    key: str
    nbytes: int                     # declared size
    offset: int                     # file offset of the slot (aligned)
    slot_bytes: int                 # bytes reserved (nbytes rounded up to the alignment)
    state: BlobState = BlobState.EMPTY
    crc: int | None = None          # checksum of the last store (checksum=True), once it landed
    writing: Request | StoreRequest | None = None  # the store in flight
    loads: list[Request] = field(default_factory=list)  # loads possibly in flight


def free_bytes(directory: str) -> int:
    """Bytes an unprivileged process may still allocate in ``directory``'s file system."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _preallocate(fd: int, offset: int, length: int) -> None:
    """Reserve blocks: fallocate(2) through posix_fallocate; zero-fill where unsupported."""
    try:
        os.posix_fallocate(fd, offset, length)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
            raise
    zeros = bytes(1 << 20)
    done = 0
    while done < length:
        n = min(len(zeros), length - done)
        written = os.pwrite(fd, zeros[:n], offset + done)
        if written <= 0:
            raise OSError(errno.EIO, f"preallocation stopped after {done} B")
        done += written


class _DirLock:
    """An flock'ed ``<name>.swap.lock`` holding our pid; knows the pid it found there."""

    def __init__(self, path: Path):
        self.path = path
        for _ in range(10):  # retry if the lock file was replaced while we took it
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OSError(errno.EBUSY, f"the swap space is in use by pid {holder}, which holds {path}; "
                                           f"give this run another nvme_dir (or swap name)", str(path)) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise OSError(errno.EBUSY, f"could not take {path}: it keeps being replaced", str(path))
        self.fd = fd
        self.previous_pid = os.pread(fd, 64, 0).decode(errors="replace").strip() or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)  # drops the flock
        self.fd = None


def _remove_files(file: AsyncFile | None, swap_path: Path, lock: _DirLock | None,
                  workers: ChecksumWorkers | None = None) -> None:
    """Close the engine (waiting for IO), stop the checksum workers, remove the swap and lock files."""
    try:
        if file is not None and not file.closed:
            file.close()
    finally:
        if workers is not None:
            workers.stop()
        try:
            os.unlink(swap_path)
        except FileNotFoundError:
            pass
        if lock is not None:
            lock.release()


class SwapSpace:
    """Named blobs in ``<directory>/<name>.swap``; see the module docstring."""

    def __init__(self, directory: str | os.PathLike, blobs: Mapping[str, int] | None = None, *,
                 name: str = "hetmem", backend: str = DEFAULT_BACKEND, block_size: int | str = DEFAULT_BLOCK_SIZE,
                 queue_depth: int = DEFAULT_QUEUE_DEPTH, threads: int = DEFAULT_THREADS, direct: bool = True,
                 checksum: bool = False, owned_bytes: Callable[[torch.Tensor], int | None] | None = None):
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"name={name!r} must be a plain file name stem such as 'hetmem'")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"{name}.swap"            # the swap file
        self.lock_path = self.directory / f"{name}.swap.lock"  # flock'ed, holds our pid
        self.slot_alignment = max(SLOT_ALIGNMENT, os.statvfs(self.directory).f_bsize)
        self.checksum = bool(checksum)
        # bytes a buffer owns from its start (aligned padding included), None if unknown: buffers
        # owning their whole slot move it whole (no staging of a partial last page)
        self._owned_bytes = owned_bytes or padded_nbytes
        # (name, function(ptr, nbytes)) of the blob checksum; crc32c unless the op is missing
        self.checksum_algorithm, checksum_fn = blob_checksum() if checksum else ("off", None)
        self._lock = threading.RLock()          # guards _blobs, _size and the blob states
        self._blobs: dict[str, _Blob] = {}      # key -> layout and state, in declaration order
        self._size = 0                           # bytes of the file reserved so far
        # live totals: blob bytes issued; checksum bytes and seconds on any thread, and the part
        # a waiting thread computed itself (the checksum workers add to these)
        self.stats = {"stored_bytes": 0, "loaded_bytes": 0, "checksum_bytes": 0, "checksum_seconds": 0.0,
                      "checksum_inline_seconds": 0.0}
        # the threads taking and verifying checksums, for the swap space's life (checksum=True)
        self._checksums = ChecksumWorkers(checksum_fn, name, self.stats) if checksum else None
        self._recorder: IoRecorder | None = None  # set while recording() runs
        self._file: AsyncFile | None = None
        self._dir_lock: _DirLock | None = None
        self._closed = False
        self._dir_lock = _DirLock(self.lock_path)
        try:
            self._remove_stale()
            layout = self._layout(blobs or {})
            self._check_space(layout)
            self._file = AsyncFile(self.path, backend=backend, block_size=block_size, queue_depth=queue_depth,
                                   threads=threads, direct=direct)
            self._commit(layout)
        except BaseException:
            _remove_files(self._file, self.path, self._dir_lock, self._checksums)
            raise
        # Remove the files if the object is dropped without close() (not after a crash:
        # the next run's stale-file cleanup handles that).
        self._finalizer = weakref.finalize(self, _remove_files, self._file, self.path, self._dir_lock,
                                           self._checksums)

    # -- layout ----------------------------------------------------------------------------

    def _remove_stale(self) -> None:
        previous = self._dir_lock.previous_pid
        if self.path.exists():
            logger.warning("removing stale swap file %s (%s) left by pid %s, which no longer holds %s",
                           self.path, format_bytes(self.path.stat().st_size), previous or "?", self.lock_path)
            self.path.unlink()

    def _layout(self, blobs: Mapping[str, int]) -> list[_Blob]:
        new: list[_Blob] = []
        offset = self._size
        for key, nbytes in blobs.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"swap blob key {key!r} must be a non-empty str")
            if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
                raise ValueError(f"swap blob {key!r}: nbytes={nbytes!r} must be an int > 0")
            known = self._blobs.get(key)
            if known is not None:
                if known.nbytes != nbytes:
                    raise ValueError(f"swap blob {key!r} is declared with {known.nbytes} B already; "
                                     f"cannot re-declare it with {nbytes} B")
                continue
            if any(b.key == key for b in new):
                continue
            slot = _round_up(nbytes, self.slot_alignment)
            new.append(_Blob(key, nbytes, offset, slot))
            offset += slot
        return new

    def _check_space(self, layout: list[_Blob]) -> None:
        needed = sum(b.slot_bytes for b in layout)
        free = free_bytes(str(self.directory))
        if needed > free:
            raise OSError(errno.ENOSPC, f"swap space needs {needed} B ({format_bytes(needed)}) more in "
                                        f"{self.directory} but only {free} B ({format_bytes(free)}) are free; "
                                        f"free space there, point nvme_dir at a larger disk, or keep more in host "
                                        f"memory", str(self.directory))

    def _commit(self, layout: list[_Blob]) -> None:
        if not layout:
            return
        end = layout[-1].offset + layout[-1].slot_bytes
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            _preallocate(fd, self._size, end - self._size)
        except OSError as exc:
            os.ftruncate(fd, self._size)
            raise OSError(exc.errno, f"preallocating {end - self._size} B of swap in {self.path} failed: "
                                     f"{exc.strerror}", str(self.path)) from exc
        finally:
            os.close(fd)
        for blob in layout:
            self._blobs[blob.key] = blob
        self._size = end

    def reserve(self, blobs: Mapping[str, int]) -> None:
        """Declare more blobs (key -> bytes); checks free space and preallocates them now."""
        with self._lock:
            self._check_open()
            layout = self._layout(blobs)
            self._check_space(layout)
            self._commit(layout)

    # -- IO --------------------------------------------------------------------------------

    def store(self, key: str, tensor: torch.Tensor) -> Request | StoreRequest:
        """Write ``tensor``'s bytes as blob ``key`` (async).  Its size must be the declared one.  With
        checksums the request is a ``StoreRequest``: done once the write and the checksum are."""
        with self._lock:
            blob = self._blob_for_io(key, tensor, "store")
            self._settle(blob)
            if blob.writing is not None or blob.loads:
                what = "a store" if blob.writing is not None else "a load"
                raise ValueError(f"store({key!r}): {what} of this blob is still in flight; wait() for it first")
            io_bytes = self._io_bytes(tensor, blob)
            req = self._file.submit(True, tensor, blob.offset, nbytes=io_bytes)
            if self._checksums is not None:  # taken on the crc worker while the write is in flight
                req = StoreRequest(req, self._checksums.take(tensor, blob.nbytes))
            blob.state, blob.writing, blob.crc = BlobState.WRITING, req, None
            self.stats["stored_bytes"] += blob.nbytes
            if self._recorder is not None:
                self._recorder.add("write", key, blob.offset, io_bytes, req)
            return req

    def load(self, key: str, into: torch.Tensor) -> Request:
        """Read blob ``key`` into ``into`` (async); ``wait()`` checks the checksum if enabled."""
        with self._lock:
            blob = self._blob_for_io(key, into, "load")
            self._settle(blob)
            if blob.state is not BlobState.STORED:
                reason = blob.state.value
                if blob.state is BlobState.FAILED:
                    reason += " (its bytes on disk are not valid; store it again)"
                elif blob.state is BlobState.WRITING:
                    reason += " (wait() for the store first)"
                raise ValueError(f"load({key!r}): cannot load this blob: {reason}")
            on_success = None
            if self.checksum:
                on_success = self._verifier(blob, into)
            io_bytes = self._io_bytes(into, blob)
            req = self._file.submit(False, into, blob.offset, nbytes=io_bytes, on_success=on_success)
            if self._checksums is not None:
                self._checksums.settle(req)  # verified on the worker as soon as it lands
            blob.loads.append(req)
            self.stats["loaded_bytes"] += blob.nbytes
            if self._recorder is not None:
                self._recorder.add("read", key, blob.offset, io_bytes, req)
            return req

    def _blob_for_io(self, key: str, tensor: torch.Tensor, what: str) -> _Blob:
        self._check_open()
        blob = self._blobs.get(key)
        if blob is None:
            raise KeyError(f"{what}({key!r}): no such blob in swap space {self.path}; declare it in the "
                           f"constructor or with reserve() ({len(self._blobs)} blobs declared)")
        _check_tensor(tensor, "into" if what == "load" else "tensor")
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes != blob.nbytes:
            raise ValueError(f"{what}({key!r}): the tensor has {nbytes} B but the blob was declared with "
                             f"{blob.nbytes} B")
        return blob

    def _io_bytes(self, tensor: torch.Tensor, blob: _Blob) -> int:
        """The whole aligned slot when the tensor is a buffer owning that much (``owned_bytes``)."""
        whole = _round_up(blob.nbytes, SLOT_ALIGNMENT)
        owned = self._owned_bytes(tensor)
        return whole if owned is not None and owned >= whole else blob.nbytes

    def _settle(self, blob: _Blob) -> None:
        """Fold finished requests into the blob's state."""
        if blob.writing is not None and blob.writing.done():
            failed = blob.writing.error is not None
            blob.state = BlobState.FAILED if failed else BlobState.STORED
            if isinstance(blob.writing, StoreRequest) and not failed:
                blob.crc = blob.writing.crc.result()  # done: returns at once
            blob.writing = None
        blob.loads = [r for r in blob.loads if not r.done()]

    def _verifier(self, blob: _Blob, into: torch.Tensor):
        expected, key, offset, path, checksums = blob.crc, blob.key, blob.offset, str(self.path), self._checksums

        def verify() -> None:  # on the verify worker, or on the thread that waits first
            actual = checksums.checksum(into, blob.nbytes)
            if actual != expected:
                raise SwapChecksumError(key, path, offset, blob.nbytes, expected, actual, self.checksum_algorithm)

        return verify

    # -- introspection ---------------------------------------------------------------------

    def recording(self, idle_poll_s: float | None = None) -> IoRecorder:
        """A context manager recording every store and load issued inside it (its ``records``);
        ``idle_poll_s``: also measure the time nothing of it was in flight (``idle_s``)."""
        return IoRecorder(self, idle_poll_s)

    @property
    def file(self) -> AsyncFile:
        """The AsyncFile under the swap space (its backend, direct flag, alignment)."""
        self._check_open()
        return self._file

    @property
    def nbytes(self) -> int:
        """Bytes of the swap file reserved (all declared slots)."""
        return self._size

    def keys(self) -> list[str]:
        return list(self._blobs)

    def blob_nbytes(self, key: str) -> int:
        return self._blobs[key].nbytes

    def stored_checksum(self, key: str) -> int | None:
        """The checksum of blob ``key``'s last store once it landed (None: checksums off, never
        stored, the store still in flight or failed)."""
        with self._lock:
            blob = self._blobs[key]
            self._settle(blob)
            return blob.crc if blob.state is BlobState.STORED else None

    def state(self, key: str) -> BlobState:
        with self._lock:
            blob = self._blobs[key]
            self._settle(blob)
            return blob.state

    # -- lifetime --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"swap space {self.path} is closed")

    def close(self) -> None:
        """Wait for every request, then remove the swap and lock files.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        _remove_files(self._file, self.path, self._dir_lock, self._checksums)

    def __enter__(self) -> "SwapSpace":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except OSError as close_error:
            logger.error("closing swap space %s after an error: %s", self.path, close_error)

    def __repr__(self) -> str:
        return (f"<SwapSpace {self.path}: {len(self._blobs)} blobs, {format_bytes(self._size)}, "
                f"checksum={self.checksum_algorithm}>")
