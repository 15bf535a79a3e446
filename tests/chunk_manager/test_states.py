"""Transitions are data; an illegal one raises, naming the parameter."""
from __future__ import annotations

import pytest

from hetmem.chunk_manager.states import (TENSOR_TRANSITIONS, IllegalTransition, TensorState, Tier,
                                         check_tensor_transition, check_tier_move)


def test_every_state_has_a_row_and_documented_members():
    assert set(TENSOR_TRANSITIONS) == set(TensorState)
    for member in TensorState:
        assert member.value


@pytest.mark.parametrize("src", list(TensorState))
@pytest.mark.parametrize("dst", list(TensorState))
def test_table_decides(src, dst):
    if src is dst or dst in TENSOR_TRANSITIONS[src]:
        check_tensor_transition("w", src, dst)
    else:
        with pytest.raises(IllegalTransition, match=f"parameter 'w': {src.name} -> {dst.name}"):
            check_tensor_transition("w", src, dst)


def test_gradient_in_slot_only_leaves_through_the_step():
    assert TENSOR_TRANSITIONS[TensorState.GRAD_IN_SLOT] == {TensorState.HOLD}
    with pytest.raises(IllegalTransition, match="holds the gradient until engine.step"):
        check_tensor_transition("h.0.w", TensorState.GRAD_IN_SLOT, TensorState.COMPUTE)


def test_tier_moves():
    check_tier_move("PARAM#0", Tier.HOST, Tier.DEVICE)
    check_tier_move("PARAM#0", Tier.NVME, Tier.HOST)
    with pytest.raises(IllegalTransition, match="PARAM#0: a move nvme -> device is not legal"):
        check_tier_move("PARAM#0", Tier.NVME, Tier.DEVICE)
