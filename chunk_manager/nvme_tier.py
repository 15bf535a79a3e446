"""The NVMe tier of the chunk manager: one swap-space blob per chunk.

Every chunk gets a blob of its size when the engine starts (so free space is checked and the
file preallocated before training, never mid-run).  A chunk moves host -> NVMe by a store
from its payload and NVMe -> host by a load into an aligned (pinned on GPU machines) host
buffer, so O_DIRECT needs no staging copy.  ``nvme_valid`` on a chunk says its blob holds its
current bytes: spilling such a chunk writes nothing.
"""
from __future__ import annotations

import errno
import logging
import os

import torch

from hetmem.nvme import SwapSpace, aligned_tensor

from .chunk import Chunk

logger = logging.getLogger("hetmem.chunk_manager.nvme_tier")


def blob_key(chunk: Chunk) -> str:
    return f"{chunk.kind.name}#{chunk.group.index}"


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


class NvmeTier:
    def __init__(self, chunks: list[Chunk], directory: str, *, backend: str, block_size: int, queue_depth: int,
                 threads: int, checksum: bool):
        check_nvme_dir(directory)
        try:
            self.swap = SwapSpace(directory, {blob_key(c): c.nbytes for c in chunks}, backend=backend,
                                  block_size=block_size, queue_depth=queue_depth, threads=threads,
                                  checksum=checksum)
        except OSError as exc:
            if exc.errno not in _DIR_ERRORS:
                raise  # no space (the message says how much is needed), in use by another run, ...
            raise _unusable(directory, f"{_DIR_ERRORS[exc.errno]} ({exc})") from exc
        logger.info("NVMe tier: %d chunk blobs, %d bytes in %s (%s)", len(chunks), self.swap.nbytes,
                    self.swap.path, self.swap.file.backend)

    @staticmethod
    def host_buffer(dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A host payload buffer O_DIRECT can use as is (4 KiB aligned; pinned on accelerator machines)."""
        return aligned_tensor(numel, dtype)

    def store(self, chunk: Chunk, payload: torch.Tensor):
        return self.swap.store(blob_key(chunk), payload)

    def load(self, chunk: Chunk, into: torch.Tensor):
        return self.swap.load(blob_key(chunk), into=into)

    @property
    def nbytes(self) -> int:
        return self.swap.nbytes

    def close(self) -> None:
        self.swap.close()
