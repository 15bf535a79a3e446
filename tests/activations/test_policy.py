"""The activation plan: greedy by bytes x window, nothing when everything fits, feasible down to
the floor and not below it."""
from __future__ import annotations

import pytest

from hetmem.activations.policy import (MIN_OFFLOAD_BYTES, SavedRecord, floor_with_offload,
                                       floor_without_offload, plan_offload)

K = MIN_OFFLOAD_BYTES  # a unit of bytes large enough to be offloaded


def _forward_backward(sizes: list[int]):
    """A chain: forward moments 0..n-1 each save sizes[i] (free from the next moment), backward
    moments n..2n-1 use them in reverse; chunk bytes K at every moment."""
    n = len(sizes)
    records = [SavedRecord(s, packed_at=i, free_from=i + 1, used_at=2 * n - 1 - i) for i, s in enumerate(sizes)]
    moments = 2 * n
    non_model = [0] * moments
    for r in records:
        for t in range(r.packed_at, r.used_at + 1):
            non_model[t] += r.nbytes
    return records, [K] * moments, non_model


def test_window_is_from_free_until_one_moment_before_use():
    assert SavedRecord(K, 0, free_from=1, used_at=7).window(8) == range(1, 6)
    assert SavedRecord(K, 0, free_from=1, used_at=7).restore_at == 6
    assert SavedRecord(K, 0, free_from=1, used_at=None).window(8) == range(1, 8)  # never used again
    assert not SavedRecord(K, 0, free_from=None, used_at=7).window(8)  # never ours alone
    assert not SavedRecord(K, 3, free_from=4, used_at=5).window(8)  # back before it could leave
    assert not SavedRecord(K - 1, 0, free_from=1, used_at=7).window(8)  # too small to bother


def test_nothing_is_offloaded_when_every_moment_fits():
    records, chunks, non_model = _forward_backward([K, 2 * K, 3 * K])
    usable = floor_without_offload(chunks, non_model)
    plan = plan_offload(records, chunks, non_model, usable)
    assert plan.feasible and not plan.restore_at and not any(plan.saving)


def test_largest_times_longest_first_and_only_what_the_deficit_needs():
    # record 0 is small but lives longest, record 1 large and shorter-lived, record 2 used at once
    records, chunks, non_model = _forward_backward([K, 4 * K, 2 * K])
    need = floor_without_offload(chunks, non_model)
    plan = plan_offload(records, chunks, non_model, need - K)
    # totals per moment 2K 6K 8K 8K 6K 2K: moments 2 and 3 are K over.  Windows: r0 [1, 3]
    # (score 3 moments x K), r1 [2] (1 x 4K), r2 none.  r1 goes first and fixes moment 2; moment 3
    # still needs r0; r2 can never help.
    assert list(plan.restore_at) == [1, 0]
    assert plan.restore_at == {1: records[1].used_at - 1, 0: records[0].used_at - 1}
    assert plan.feasible
    assert plan.saving == [0, K, 5 * K, K, 0, 0]


def test_records_away_only_when_nothing_is_short_are_skipped():
    long_lived = SavedRecord(8 * K, packed_at=0, free_from=2, used_at=None)  # away over [2, 3]
    short = SavedRecord(2 * K, packed_at=0, free_from=1, used_at=3)          # away over [1]
    plan = plan_offload([long_lived, short], [0] * 4, [0, 10 * K, 0, 0], 9 * K)
    assert list(plan.restore_at) == [1] and plan.restore_at[1] == 2
    assert plan.saving == [0, 2 * K, 0, 0]


def test_feasible_exactly_down_to_the_floor():
    records, chunks, non_model = _forward_backward([3 * K, K, 2 * K, 5 * K, K])
    floor = floor_with_offload(records, chunks, non_model)
    assert floor < floor_without_offload(chunks, non_model)
    plan = plan_offload(records, chunks, non_model, floor)
    assert plan.feasible
    for t in range(len(chunks)):  # every moment fits with the plan
        assert chunks[t] + non_model[t] - plan.saving[t] <= floor
    below = plan_offload(records, chunks, non_model, floor - 1)
    assert not below.feasible and below.deficit == 1


@pytest.mark.parametrize("excluded", [{0}, {0, 1, 2, 3, 4}])
def test_excluded_records_are_never_chosen(excluded):
    records, chunks, non_model = _forward_backward([3 * K, K, 2 * K, 5 * K, K])
    plan = plan_offload(records, chunks, non_model, 0, excluded=excluded)
    assert not set(plan.restore_at) & excluded
