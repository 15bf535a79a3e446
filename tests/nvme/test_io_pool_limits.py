"""IoBufferPool under random takes and frees (its limits, no leaked block) and resident_bytes(), the
kernel's count of the region's pages in memory (mincore)."""
from __future__ import annotations

import random

import pytest

from hetmem.nvme.io_pool import PAGE, IoBufferPool

KiB, MiB = 1024, 1 << 20


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_takes_and_frees_never_exceed_the_capacity_overlap_or_leak(seed):
    rng = random.Random(seed)
    pool = IoBufferPool(6 * MiB, lock="off", prefault=False, large=MiB)
    sizes = [1, 4095, 4097, 12 * KiB, 60 * KiB, 300 * KiB, MiB - 3, MiB + 1, 2 * MiB, 7 * MiB]
    held = []
    for _ in range(400):
        if held and rng.random() < 0.45:
            held.pop(rng.randrange(len(held)))
            continue
        numel = rng.choice(sizes)
        block = pool.take(numel)
        if block is None:
            continue
        assert block.numel() == numel and block.data_ptr() % PAGE == 0
        held.append(block)
        spans = sorted((h.data_ptr(), h.data_ptr() + pool.owned_bytes(h)) for h in held)
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
        assert spans[0][0] >= pool.address and spans[-1][1] <= pool.address + pool.capacity
        assert pool.in_use == sum(end - start for start, end in spans) <= pool.capacity
    assert pool.take(7 * MiB) is None and pool.refusals >= 1  # larger than the pool: refused, counted
    held.clear()
    block = None
    assert pool.in_use == 0 and pool.stats()["live_blocks"] == 0  # no block leaked
    assert pool.stats()["free_ranges"] == 1 and pool.largest_free() == 6 * MiB  # coalesced whole


def test_resident_bytes_are_the_pages_touched_not_the_capacity():
    assert IoBufferPool(4 * MiB, lock="off").resident_bytes() == 4 * MiB  # prefaulted
    lazy = IoBufferPool(4 * MiB, lock="off", prefault=False, huge=False)
    assert lazy.resident_bytes() == 0
    block = lazy.take(3 * PAGE)
    block[::PAGE].fill_(1)  # one write per page faults it in
    assert lazy.resident_bytes() == 3 * PAGE
    lazy.close()
    assert lazy.resident_bytes() == 0
