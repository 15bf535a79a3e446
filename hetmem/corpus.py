"""The small text corpus shipped with hetmem (public domain; see hetmem/data/README.md),
as bytes, and random training windows over it."""
from __future__ import annotations

from pathlib import Path

import torch

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"


def load_corpus(path: str | Path | None = None) -> torch.Tensor:
    """The corpus as a 1-D uint8 tensor of bytes (vocabulary 256)."""
    data = Path(path or CORPUS).read_bytes()
    if len(data) < 2:
        raise ValueError(f"corpus {str(path or CORPUS)!r} has {len(data)} bytes; need at least 2")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def random_batch(data: torch.Tensor, batch_size: int, block_size: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (batch_size, block_size) int64: targets are inputs shifted by one."""
    if len(data) <= block_size:
        raise ValueError(f"corpus of {len(data)} bytes is too short for block_size={block_size}")
    starts = torch.randint(0, len(data) - block_size - 1, (batch_size,), generator=generator)
    rows = torch.stack([data[s: s + block_size + 1] for s in starts.tolist()]).long()
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
