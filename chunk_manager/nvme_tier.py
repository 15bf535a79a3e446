"""The NVMe tier of the chunk manager: one swap-space blob per chunk.

Every chunk gets a blob of its size when the engine starts (so free space is checked and the
file preallocated before training, never mid-run).  A chunk moves host -> NVMe by a store
from its payload and NVMe -> host by a load into an aligned (pinned on GPU machines) host
buffer, so O_DIRECT needs no staging copy.  ``nvme_valid`` on a chunk says its blob holds its
current bytes: spilling such a chunk writes nothing.
"""
from __future__ import annotations

import logging

import torch

from hetmem.nvme import SwapSpace, aligned_tensor

from .chunk import Chunk

logger = logging.getLogger("hetmem.chunk_manager.nvme_tier")


def blob_key(chunk: Chunk) -> str:
    return f"{chunk.kind.name}#{chunk.group.index}"


class NvmeTier:
    def __init__(self, chunks: list[Chunk], directory: str, *, backend: str, block_size: int, queue_depth: int,
                 threads: int, checksum: bool):
        self.swap = SwapSpace(directory, {blob_key(c): c.nbytes for c in chunks}, backend=backend,
                              block_size=block_size, queue_depth=queue_depth, threads=threads, checksum=checksum)
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
