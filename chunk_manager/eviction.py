"""Which device chunk to evict: Belady from the traced schedule, LRU without one.

Belady evicts the chunk whose next use is farthest away; with a recorded schedule that is
known exactly.  During warm-up (no schedule yet) the least recently used chunk goes.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from .chunk import Chunk

NextUse = Callable[[int], "float | None"]  # chunk id -> moments until next use, None: unknown


class EvictionPolicy:
    def __init__(self, next_use: NextUse):
        self._next_use = next_use

    def choose(self, candidates: Sequence[Chunk]) -> tuple[Chunk, str]:
        """The victim and a one-line reason (for the report)."""
        if not candidates:
            raise ValueError("no eviction candidates")
        uses = {c.id: self._next_use(c.id) for c in candidates}
        if all(u is not None for u in uses.values()):
            victim = max(candidates, key=lambda c: (uses[c.id], -c.last_use))
            distance = uses[victim.id]
            when = "never used again" if math.isinf(distance) else f"next use in {int(distance)} moments"
            return victim, f"Belady: {when}"
        victim = min(candidates, key=lambda c: c.last_use)
        return victim, f"LRU: last used at moment clock {victim.last_use}"

    def next_use(self, chunk: Chunk) -> float | None:
        return self._next_use(chunk.id)
