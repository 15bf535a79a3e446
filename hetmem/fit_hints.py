"""The values that construction errors propose (``chunk_size <= N``, ``device_budget >= B``),
computed by packing the model again the way the Engine would, so that following a hint works.

A module's parameters must be on the device at once: the bytes of every PARAM chunk holding one
of them.  A smaller chunk size helps only while those chunks also hold other modules'
parameters; a parameter larger than the chunk size gets a chunk of its own, sized to it, so no
chunk size brings a module below the bytes of its own parameters.  The Engine rounds
``chunk_size`` up to a multiple of CHUNK_ALIGN and, with ``chunk_size="auto"``, sizes chunks
from the device budget; both are replayed here.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from hetmem.chunk_manager.chunk import CHUNK_ALIGN
from hetmem.chunk_manager.sizing import choose_capacity, pack_trimmed
from hetmem.layout import Layout
from hetmem.units import format_bytes

SHRINK = 0.8          # chunk_size candidates: the current one times SHRINK^k, aligned
MAX_BUDGET_ROUNDS = 8  # raising the budget under "auto" sizing may grow the chunks: re-check


def module_need_bytes(layout: Layout, capacity: int, element_bytes: int) -> dict[nn.Module, int]:
    """Device bytes each module's PARAM chunks take if the layout is packed at ``capacity``
    (trainable and frozen parameters packed apart and each chunk trimmed, as build_layout does)."""
    group_of: dict[int, int] = {}
    capacities: list[int] = []
    for trainable in (True, False):
        members = [s for s in layout.slots if s.trainable is trainable]
        if not members:
            continue
        packing = pack_trimmed([s.numel for s in members], capacity)
        for group, group_capacity in zip(packing.groups, packing.capacities):
            for member_index, _, _ in group:
                group_of[id(members[member_index])] = len(capacities)
            capacities.append(group_capacity)
    return {module: sum(capacities[g] for g in {group_of[id(s)] for s in slots}) * element_bytes
            for module, slots in layout.module_slots.items()}


def fitting_chunk_size(layout: Layout, usable: int, element_bytes: int) -> int | None:
    """The largest tried chunk size (elements, a multiple of CHUNK_ALIGN, below the current
    one) at which every module fits ``usable`` device bytes; None when none does."""
    capacity = layout.chunk_elements
    tried = set()
    while capacity > CHUNK_ALIGN:
        capacity = max(CHUNK_ALIGN, int(capacity * SHRINK) // CHUNK_ALIGN * CHUNK_ALIGN)
        if capacity in tried:
            continue
        tried.add(capacity)
        if max(module_need_bytes(layout, capacity, element_bytes).values()) <= usable:
            return capacity
    return None


def fitting_device_budget(layout: Layout, need: int, margin: int, element_bytes: int,
                          auto_max_elements: Callable[[int], int] | None) -> int:
    """A device budget at which every module's chunks fit: ``need`` + margin, raised again
    while "auto" sizing (``auto_max_elements(usable)``: its largest chunk; None: chunk_size is
    fixed) would pick chunks that need more."""
    budget = need + margin
    if auto_max_elements is None:
        return budget
    numels = [s.numel for s in layout.slots]
    for _ in range(MAX_BUDGET_ROUNDS):
        capacity = choose_capacity(numels, max_elements=auto_max_elements(budget - margin))
        largest = max(module_need_bytes(layout, capacity, element_bytes).values())
        if largest <= budget - margin:
            break
        budget = largest + margin
    return budget


def fit_advice(layout: Layout, usable: int, margin: int, element_bytes: int,
               auto_max_elements: Callable[[int], int] | None) -> str:
    """The fix when some module's chunks do not fit ``usable``: the device budget at which all
    fit and, when one exists, the chunk_size at which all fit the current budget."""
    need = max(module_need_bytes(layout, layout.chunk_elements, element_bytes).values())
    budget = fitting_device_budget(layout, need, margin, element_bytes, auto_max_elements)
    advice = f"raise device_budget to at least {format_bytes(budget)} plus the activations"
    chunk_size = fitting_chunk_size(layout, usable, element_bytes)
    if chunk_size is None:
        return f"{advice} (no smaller chunk_size fits: a module's own parameters exceed the budget)"
    return f"{advice}, or set chunk_size <= {chunk_size} elements"
