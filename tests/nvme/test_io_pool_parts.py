"""The NVMe IO pool's parts: the small payloads' part, the reserve that is faulted in only when used,
the plan that sizes them, and the pool's limits with all of them (nvme/io_pool.py)."""
from __future__ import annotations

import random

import pytest
import torch

from hetmem.nvme.io_pool import PAGE, IoBufferPool, plan_parts

KiB, MiB = 1024, 1 << 20


def test_plan_sizes_the_pool_from_the_payloads_and_the_budget():
    sizes = [16 * MiB] * 4 + [8 * MiB] * 2 + [12 * KiB + 5] * 6 + [800 * KiB]
    plan = plan_parts(sizes, host_limit=40 * MiB)
    assert plan["reserve"] == 2 * 16 * MiB
    assert plan["capacity"] == 40 * MiB + 2 * 16 * MiB          # the budget, not every payload, + the reserve
    assert plan["large"] == 8 * MiB + 1
    assert plan["small"] == 1 * MiB                              # a sixteenth of the largest
    assert plan["small_bytes"] == 6 * 16 * KiB + 800 * KiB       # every payload below it, page-padded
    everything = plan_parts(sizes, host_limit=1 << 40)
    assert everything["capacity"] == sum(-(-n // PAGE) * PAGE for n in sizes) + 32 * MiB
    assert plan_parts([4 * MiB] * 3, host_limit=64 * MiB)["small"] is None  # no payload below: no small part
    with pytest.raises(ValueError, match="at least one payload"):
        plan_parts([], host_limit=MiB)


def test_small_blocks_stay_in_their_part_and_never_split_the_main_ranges():
    pool = IoBufferPool(8 * MiB, lock="off", small=256 * KiB, small_bytes=64 * KiB)
    small = [pool.take(4 * KiB) for _ in range(16)]  # fills the small part exactly
    assert all(pool.address <= t.data_ptr() < pool.address + 64 * KiB for t in small)
    assert pool.largest_free() == 8 * MiB - 64 * KiB  # the main part is whole
    spilled = pool.take(4 * KiB)  # the small part is full: the main part serves it
    assert spilled is not None and spilled.data_ptr() >= pool.address + 64 * KiB
    big = pool.take(2 * MiB)
    assert big is not None and pool.stats()["parts"]["main"]["in_use"] == 4 * KiB + 2 * MiB
    del small, spilled, big
    assert pool.in_use == 0 and pool.largest_free() == 8 * MiB - 64 * KiB


def test_the_reserve_is_not_faulted_in_and_serves_only_what_the_rest_cannot():
    pool = IoBufferPool(8 * MiB, lock="off", huge=False, reserve=2 * MiB)
    assert pool.prepared == 6 * MiB and pool.resident_bytes() == 6 * MiB  # prefaulted, the reserve is not
    below = [pool.take(MiB) for _ in range(6)]
    assert all(t.data_ptr() + MiB <= pool.address + pool.prepared for t in below)
    assert pool.resident_bytes() == 6 * MiB  # nothing asked for the reserve yet
    over = pool.take(MiB)
    assert over is not None and over.data_ptr() >= pool.address + pool.prepared
    over.fill_(1)  # its first use faults its pages in
    assert pool.resident_bytes() == 7 * MiB
    assert pool.take(2 * MiB) is None and pool.refusals == 1  # too large for what is left: refused, counted


def test_large_blocks_go_as_high_as_they_fit_below_the_reserve():
    pool = IoBufferPool(16 * MiB, lock="off", prefault=False, large=4 * MiB, reserve=4 * MiB)
    large = pool.take(4 * MiB)
    assert large.data_ptr() == pool.address + 12 * MiB - 4 * MiB  # the top of the prepared part
    small = pool.take(MiB)
    assert small.data_ptr() == pool.address  # the bottom


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_takes_and_frees_never_exceed_the_capacity_overlap_or_leak(seed):
    rng = random.Random(seed)
    pool = IoBufferPool(6 * MiB, lock="off", prefault=False, large=MiB, small=64 * KiB, small_bytes=128 * KiB,
                        reserve=MiB)
    sizes = [1, 4095, 4097, 12 * KiB, 60 * KiB, 300 * KiB, MiB - 3, MiB + 1, 2 * MiB, 7 * MiB]
    held = []
    for _ in range(400):
        if held and rng.random() < 0.45:
            held.pop(rng.randrange(len(held)))
            continue
        numel = rng.choice(sizes)
        t = pool.take(numel)
        if t is None:
            continue
        assert t.numel() == numel and t.data_ptr() % PAGE == 0
        held.append(t)
        spans = sorted((h.data_ptr(), h.data_ptr() + pool.owned_bytes(h)) for h in held)
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
        assert spans[0][0] >= pool.address and spans[-1][1] <= pool.address + pool.capacity
        assert pool.in_use == sum(end - start for start, end in spans) <= pool.capacity
    assert pool.take(7 * MiB) is None  # larger than the pool: refused
    held.clear()
    t = None  # the loop's last block
    parts = pool.stats()["parts"]
    assert pool.in_use == 0 and all(p["in_use"] == 0 for p in parts.values())  # no payload leaked
    assert pool.stats()["free_ranges"] == 2 and pool.largest_free() == 6 * MiB - 128 * KiB  # coalesced whole


def test_part_sizes_that_leave_no_main_part_name_the_values():
    with pytest.raises(ValueError, match="small_bytes=.*reserve=.*capacity"):
        IoBufferPool(MiB, lock="off", small_bytes=512 * KiB, reserve=512 * KiB)
    with pytest.raises(ValueError, match="reserve=-1"):
        IoBufferPool(MiB, lock="off", reserve=-1)
    with pytest.raises(ValueError, match="small=0"):
        IoBufferPool(MiB, lock="off", small=0, small_bytes=PAGE)


def test_views_of_small_blocks_keep_them_out_of_the_free_list():
    pool = IoBufferPool(MiB, lock="off", small=64 * KiB, small_bytes=8 * KiB)
    t = pool.take(100, torch.float32)
    view = t[10:20]
    del t
    assert pool.stats()["parts"]["small"]["in_use"] == PAGE
    del view
    assert pool.stats()["parts"]["small"]["in_use"] == 0
