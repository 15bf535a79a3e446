"""The engine's lifecycle (hetmem/lifecycle.py): one state, legal transitions as data."""
from __future__ import annotations

import pytest
import torch

import hetmem
from hetmem.chunk_manager.states import IllegalTransition
from hetmem.lifecycle import TRANSITIONS, Lifecycle, Phase
from tests.engine.helpers import batches, config, pair


def test_every_phase_has_its_transitions_written_down_and_illegal_ones_raise():
    assert set(TRANSITIONS) == set(Phase)
    lifecycle = Lifecycle()
    with pytest.raises(IllegalTransition, match="IDLE -> BACKWARD is not allowed"):
        lifecycle.go(Phase.BACKWARD)
    lifecycle.go(Phase.CLOSED)
    for phase in Phase:
        with pytest.raises(IllegalTransition, match="CLOSED ->"):
            lifecycle.go(phase)


def test_a_step_walks_the_phases_and_the_scheduler_reads_them():
    _, model = pair()
    engine = hetmem.initialize(model, config())
    seen = []
    original = engine.scheduler.pre_forward

    def pre_forward(module):
        seen.append((engine.lifecycle.state, engine.scheduler.traced, engine.scheduler.phase))
        return original(module)

    engine.scheduler.pre_forward = pre_forward
    x, y = batches(1)[0]
    assert engine.lifecycle.state is Phase.IDLE
    loss = engine(x, y)
    assert engine.lifecycle.state is Phase.FORWARD
    assert seen[0] == (Phase.FORWARD, True, "forward")
    with pytest.raises(RuntimeError, match="call engine.backward\\(loss\\) first"):
        engine.step()
    with torch.no_grad():
        engine(x, y)                                   # an untraced forward inside the micro-step
    assert engine.lifecycle.state is Phase.FORWARD    # and back
    engine.backward(loss)
    assert engine.lifecycle.state is Phase.IDLE
    with pytest.raises(RuntimeError, match="call engine\\(batch\\) first"):
        engine.backward(loss)
    assert engine.step() and engine.lifecycle.state is Phase.IDLE
    engine.close()
    assert engine.lifecycle.state is Phase.CLOSED
    with pytest.raises(RuntimeError, match="closed"):
        engine(x, y)


def test_an_error_in_forward_returns_to_idle_and_the_engine_continues():
    _, model = pair()
    engine = hetmem.initialize(model, config())
    x, y = batches(1)[0]
    with pytest.raises(Exception):
        engine(x, y[:, :3])                             # wrong target shape: the loss fails
    assert engine.lifecycle.state is Phase.IDLE
    loss = engine(x, y)
    engine.backward(loss)
    assert engine.step()
