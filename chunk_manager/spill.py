"""Which host chunk goes to NVMe when host memory is over its budget.

Optimizer states first (each is touched once per step, by the optimizer), then fp32
gradients, then master weights, then parameters (touched by every forward and backward).
Within a kind: chunks whose NVMe copy is still current first (spilling them writes
nothing), then the least recently used.  The optimizer step replaces the order while it
runs (ChunkManager.spill_preference) so that groups it has already updated go first.
"""
from __future__ import annotations

from .chunk import Chunk
from .states import ChunkKind

KIND_ORDER = {ChunkKind.EXP_AVG_SQ: 0, ChunkKind.EXP_AVG: 1, ChunkKind.GRAD: 2, ChunkKind.MASTER: 3,
              ChunkKind.PARAM: 4}


def spill_key(chunk: Chunk) -> tuple:
    """Smaller spills first."""
    return (KIND_ORDER[chunk.kind], not chunk.nvme_valid, chunk.last_use)
