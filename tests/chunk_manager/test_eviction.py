"""Belady with a schedule, LRU without."""
from __future__ import annotations

import math

import torch

from hetmem.chunk_manager.chunk import Chunk, ChunkGroup
from hetmem.chunk_manager.eviction import EvictionPolicy
from hetmem.chunk_manager.states import ChunkKind


def _chunks(n):
    chunks = []
    for i in range(n):
        group = ChunkGroup(i, 4096, [], True)
        chunk = Chunk(i, ChunkKind.PARAM, group, torch.float32)
        chunk.last_use = 10 - i
        chunks.append(chunk)
    return chunks


def test_belady_evicts_the_farthest_next_use():
    chunks = _chunks(3)
    uses = {0: 5.0, 1: 2.0, 2: math.inf}
    victim, reason = EvictionPolicy(lambda cid: uses[cid]).choose(chunks)
    assert victim is chunks[2] and reason == "Belady: never used again"
    uses[2] = 1.0
    victim, reason = EvictionPolicy(lambda cid: uses[cid]).choose(chunks)
    assert victim is chunks[0] and reason == "Belady: next use in 5 moments"


def test_lru_without_schedule():
    chunks = _chunks(3)
    victim, reason = EvictionPolicy(lambda cid: None).choose(chunks)
    assert victim is chunks[2]  # last_use 8 is the oldest
    assert reason.startswith("LRU")
