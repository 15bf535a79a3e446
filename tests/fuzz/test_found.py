"""What the fuzzer found, kept as fixed sequences (each failed before its fix)."""
from __future__ import annotations

import os

import pytest

from tests.fuzz.twin import Pair, replay

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
    # loading again after an IO error in load_checkpoint gives the checkpoint's state
    "load_again_after_an_io_error": (True, [
        ("train", 0, "none"), ("save",), ("step",), ("fault", "error", 0, ("load",))]),
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_found_sequence(name):
    nvme, sequence = FOUND[name]
    replay(sequence, nvme=nvme)


def test_an_io_error_inside_load_checkpoint_loses_no_chunk():
    """An IO error while load_checkpoint wrote a chunk that lives on NVMe left the chunk pointing
    at a blob whose store failed: every later save or fetch of it raised (found by the fuzzer)."""
    pair = Pair(nvme=True)
    try:
        folder = os.path.join(pair.folder, "ckpt")
        pair.engine.save_checkpoint(folder)
        swap = pair.engine.manager.nvme.swap.file
        swap.inject_fault("error", after=0)
        with pytest.raises(OSError, match="Input/output error during pwrite"):
            pair.engine.load_checkpoint(folder)
        swap.inject_fault("none")
        pair.engine.save_checkpoint(folder)  # every chunk still readable
        for op in [("train", 0, "none"), ("step",)]:
            pair.run(op)  # and training goes on, with the checkpoint's values (the same as the start)
    finally:
        pair.close()
