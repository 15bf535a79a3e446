"""What the fuzzer found, kept as fixed sequences (each failed before its fix)."""
from __future__ import annotations

import pytest

from tests.fuzz.twin import Pair

FOUND = {
    # a store that failed during a forward's eviction was raised to the user (and the chunk
    # kept in host memory), yet engine.close() raised it again as "a request nobody waited for"
    # (when the manager's poll saw it first; the deterministic test of the fix is
    # tests/chunk_manager/test_transfer_errors.py)
    "close_after_a_reported_swap_failure": (True, [
        ("zero_grad",), ("train", 1, "none"), ("step",),
        ("fault", "error", 1, ("train", 3, "none")), ("fault", "error", 12, ("train", 0, "none")), ("load",)]),
    # two backwards before one step: the norm came from the last gradient only, so an inf in
    # the first one went unnoticed and the step wrote NaN into every weight
    "inf_gradient_then_a_finite_one_before_the_step": (False, [
        ("train", 0, "inf"), ("train", 1, "none"), ("step",), ("train", 2, "none"), ("step",)]),
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_found_sequence(name):
    nvme, sequence = FOUND[name]
    pair = Pair(nvme=nvme)
    try:
        for op in sequence:
            pair.run(op)
    finally:
        pair.close()
