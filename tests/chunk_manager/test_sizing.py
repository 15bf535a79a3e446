"""Packing keeps order, aligns slots, gives big parameters their own chunk, minimises padding."""
from __future__ import annotations

import pytest

from hetmem.chunk_manager.chunk import CHUNK_ALIGN, SLOT_ALIGN
from hetmem.chunk_manager.sizing import choose_capacity, pack


def test_pack_first_fit_in_order_with_aligned_slots():
    p = pack([10, 20, 4000, 100], 4096)
    assert p.groups == (((0, 0, 10), (1, 16, 20), (2, 48, 4000)), ((3, 0, 100),))
    assert p.capacities == (4096, 4096)
    assert p.padding == 2 * 4096 - 4130
    for group in p.groups:
        for _, offset, _ in group:
            assert offset % SLOT_ALIGN == 0


def test_parameter_larger_than_chunk_gets_its_own():
    p = pack([100, 10000, 50], 4096)
    assert p.groups[1] == ((1, 0, 10000),)
    assert p.capacities[1] == 12288 and p.capacities[1] % CHUNK_ALIGN == 0
    assert p.groups[2] == ((2, 0, 50),)  # a new chunk after the big one: order is kept


def test_bad_capacity():
    with pytest.raises(ValueError, match="multiple of 4096"):
        pack([1], 1000)


def test_choose_capacity_minimises_padding_within_bounds():
    # 24 layers of 3 tensors; the capacity that packs them tightest should be chosen
    numels = [768 * 768, 768, 4 * 768 * 768] * 4
    best = choose_capacity(numels, max_elements=1 << 22)
    assert best % CHUNK_ALIGN == 0 and best <= 1 << 22
    for other in range(best // 2 // CHUNK_ALIGN * CHUNK_ALIGN or CHUNK_ALIGN, 1 << 22, CHUNK_ALIGN * 64):
        if other >= (1 << 22) // 4:
            assert pack(numels, best).padding <= pack(numels, other).padding


def test_trimmed_cuts_each_chunk_to_what_its_parameters_reach():
    # a shared chunk closed by a parameter that needs its own chunk, and a last one: both keep no tail
    p = pack([10, 20, 10000, 100], 8192)
    assert p.capacities == (8192, 12288, 8192)
    t = p.trimmed()
    assert t.groups == p.groups
    assert t.capacities == (4096, 12288, 4096)
    assert all(c % CHUNK_ALIGN == 0 for c in t.capacities)
    assert t.used == p.used and t.padding == sum(t.capacities) - t.used
    full = pack([4096, 4096], 8192)  # a full chunk stays as it is
    assert full.trimmed().capacities == full.capacities == (8192,)
