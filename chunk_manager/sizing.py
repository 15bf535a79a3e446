"""Chunk sizing and packing: parameters in order, first fit, least padding.

Parameters keep their registration order (which is close to forward order), so a module's
parameters are adjacent and a moment needs few chunks.  A parameter larger than the chunk
capacity gets a chunk of its own, sized to it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .chunk import CHUNK_ALIGN, SLOT_ALIGN

MAX_CANDIDATES = 256
RUN_STARTS = 32                    # run-sum candidates start at the first parameters
MAX_CHUNK_ELEMENTS = 64 << 20      # 256 MiB of fp32 per chunk: keeps pipelines granular


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Packing:
    """Groups of (param index, offset, numel) and each group's capacity in elements."""

    groups: tuple[tuple[tuple[int, int, int], ...], ...]
    capacities: tuple[int, ...]

    @property
    def used(self) -> int:
        return sum(numel for group in self.groups for _, _, numel in group)

    @property
    def padding(self) -> int:
        """Elements allocated but holding no parameter (alignment gaps and chunk tails)."""
        return sum(self.capacities) - self.used

    def trimmed(self) -> "Packing":
        """Each chunk cut to what its parameters reach, rounded up to CHUNK_ALIGN.

        A shared chunk closed early (the next parameter needed a chunk of its own, or the model
        ended) would otherwise carry an empty tail that costs host memory and NVMe bytes on every
        move: in a GPT, each layer's layer-norm and bias chunks were 99% tail, 17% of all chunk
        bytes for d_model 1024 (README "Memory overhead").  The capacity is still chosen on the
        untrimmed packing (``choose_capacity``), so trimming changes no grouping."""
        capacities = tuple(min(capacity, round_up(max(offset + numel for _, offset, numel in group), CHUNK_ALIGN))
                           for group, capacity in zip(self.groups, self.capacities))
        return Packing(self.groups, capacities)


def pack(numels: list[int], capacity: int) -> Packing:
    """First fit in order: a parameter that does not fit the open chunk starts a new one."""
    if capacity <= 0 or capacity % CHUNK_ALIGN:
        raise ValueError(f"chunk capacity {capacity} must be a positive multiple of {CHUNK_ALIGN} elements")
    groups: list[list[tuple[int, int, int]]] = []
    capacities: list[int] = []
    cursor = capacity  # no open chunk
    for index, numel in enumerate(numels):
        if numel > capacity:  # a chunk of its own
            groups.append([(index, 0, numel)])
            capacities.append(round_up(numel, CHUNK_ALIGN))
            cursor = capacity
            continue
        offset = round_up(cursor, SLOT_ALIGN)
        if offset + numel > capacity:
            groups.append([])
            capacities.append(capacity)
            offset = 0
        groups[-1].append((index, offset, numel))
        cursor = offset + numel
    return Packing(tuple(tuple(g) for g in groups), tuple(capacities))


def pack_trimmed(numels: list[int], capacity: int) -> Packing:
    """The packing the Engine builds: ``pack`` at ``capacity``, each chunk then trimmed."""
    return pack(numels, capacity).trimmed()


def choose_capacity(numels: list[int], *, max_elements: int) -> int:
    """The capacity in [max/4, max] (multiples of CHUNK_ALIGN) with the least padding.

    ``max_elements`` comes from the device budget (a moment must hold several chunks).
    Candidates are an even grid plus the sizes of runs of consecutive parameters (a layer's
    worth packs with no tail).  Ties go to the larger capacity: fewer chunks, fewer moves.
    """
    if not numels:
        return CHUNK_ALIGN
    total = sum(numels)
    hi = min(max_elements, MAX_CHUNK_ELEMENTS, max(max(numels), -(-total // 2)))
    hi = max(CHUNK_ALIGN, hi // CHUNK_ALIGN * CHUNK_ALIGN)
    lo = max(CHUNK_ALIGN, (hi // 4) // CHUNK_ALIGN * CHUNK_ALIGN)
    step = max(CHUNK_ALIGN, ((hi - lo) // MAX_CANDIDATES) // CHUNK_ALIGN * CHUNK_ALIGN)
    candidates = set(range(lo, hi + 1, step)) | {hi}
    for start in range(min(len(numels), RUN_STARTS)):
        run = 0
        for numel in numels[start:]:
            run = round_up(run, SLOT_ALIGN) + numel
            size = round_up(run, CHUNK_ALIGN)
            if size > hi:
                break
            if size >= lo:
                candidates.add(size)
    return min(candidates, key=lambda c: (pack(numels, c).padding, -c))
