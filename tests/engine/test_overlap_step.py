"""The overlapped optimizer step (hetmem/step_pipeline.py) is the synchronous step, bit for bit.

Two engines on the same model and batches, ``overlap_step`` on and off, state on NVMe with a
device budget that moves chunks in every step: after 20 steps every chunk's bytes (weights,
master weights, Adam moments), every step count and every loss are equal (``torch.equal``,
``==``), and the overlapped engine really left its steps to the next forward.
"""
from __future__ import annotations

import pytest
import torch

import hetmem
from hetmem.chunk_manager.states import ChunkKind, Tier
from tests.engine.checkpoint_state import training_state
from tests.engine.helpers import assert_no_pins, batches, config, pair

HOST = "900KiB"  # a third of the model's chunk bytes: most state lives on NVMe (tests/engine/test_nvme.py)
STEPS = 20


def _engine(tmp_path, name: str, **overrides):
    _, model = pair(seed=5)
    overrides.setdefault("memory_trace", False)
    return hetmem.initialize(model, config(device_budget="2304KiB", nvme_dir=str(tmp_path / name),
                                           host_budget=HOST, **overrides))


def _chunk_bytes(engine) -> dict[str, torch.Tensor]:
    """Every chunk's payload except gradients, read where it lives (nothing moves)."""
    out = {}
    for chunk in engine.manager.chunks:
        if chunk.kind is not ChunkKind.GRAD and chunk.tier is not None:
            out[chunk.name] = engine.manager.read_copy(chunk, torch.empty(chunk.capacity, dtype=chunk.dtype))
    return out


@pytest.mark.parametrize("dtype,clip", [("fp32", None), ("fp32", 0.05), ("bf16", None), ("bf16", 0.05)])
def test_overlapped_step_is_bit_identical_to_the_synchronous_step(tmp_path, dtype, clip):
    """With ``step_speculation=True`` (hetmem/speculation.py): without clipping every group may be
    updated during backward; with clipping only those whose gradients outlive the update (fp32's
    GRAD chunks, none in bf16: in-slot), rolled back and redone when the norm clips."""
    data = batches(STEPS, seed=11)
    engines = {on: _engine(tmp_path, f"swap-{on}", dtype=dtype, gradient_clipping=clip, overlap_step=on,
                           step_speculation=on) for on in (False, True)}
    losses = {False: [], True: []}
    left_to_forward = 0
    for x, y in data:
        for on, engine in engines.items():
            loss = engine(x, y)
            if on:
                assert engine.adam.pending is None  # the forward applied the last step to every group
            engine.backward(loss)
            assert engine.step()
            # a scheduler after step(): the pending update keeps the learning rate it was taken with
            engine.optimizer.param_groups[0]["lr"] *= 0.9
            if on and engine.adam.pending is not None:
                left_to_forward += 1
                assert engine.adam.pending.next == 0  # step() only issued reads
            losses[on].append(loss.item())
    assert losses[True] == losses[False]
    # the warm-up's step is applied in step() (where gradients go is decided after it)
    assert left_to_forward == STEPS - 1
    for engine in engines.values():
        assert engine.last_step is not None and not engine.last_step.skipped
        assert_no_pins(engine)
    assert engines[True].last_step.overlapped and not engines[False].last_step.overlapped
    expected, got = _chunk_bytes(engines[False]), _chunk_bytes(engines[True])
    assert expected.keys() == got.keys() and any(k.startswith("EXP_AVG_SQ") for k in got)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert [s.step for s in engines[True].layout.slots] == [s.step for s in engines[False].layout.slots]
    assert min(s.step for s in engines[True].layout.slots if s.trainable) == STEPS
    speculation = engines[True].adam.speculation.stats()
    if clip is not None:
        assert engines[True].adam.last_norm > clip  # clipping was active
    if dtype == "bf16" and clip is not None:
        assert speculation["speculated_groups"] == 0, speculation  # in-slot gradients: never speculated
    else:
        assert speculation["speculated_groups"] > 0, speculation  # the update ran during backward
        # clipping active: speculated groups were rolled back (and redone); without it none was
        rolled = speculation["rolled_back_groups"]
        assert (0 < rolled <= speculation["speculated_groups"]) if clip else rolled == 0, speculation
    for engine in engines.values():  # the budget moved chunks: the state lived on NVMe
        manager = engine.manager
        assert manager.bytes_on(Tier.NVME) > manager.bytes_on(Tier.HOST) and manager.moved_bytes > 0
        assert engine.last_step.io_bytes > 0
        engine.close()


def test_the_first_groups_state_is_read_during_backward(tmp_path):
    engine = _engine(tmp_path, "swap", dtype="bf16", step_speculation=False)  # the waiting pipeline's reads
    first = engine.layout.groups[0]
    state = [first.chunks[k] for k in (ChunkKind.MASTER, ChunkKind.EXP_AVG, ChunkKind.EXP_AVG_SQ)]
    on_nvme = []
    for x, y in batches(4, seed=2):
        loss = engine(x, y)
        before = sum(c.tier is Tier.NVME for c in state)
        engine.backward(loss)
        on_nvme.append((before, sum(c.tier is Tier.NVME for c in state)))
        engine.step()
    # steady steps: group 0's state went back to NVMe during the forward, and backward's last
    # moments read it again, so the next step's first update does not wait for the disk
    assert all(before == len(state) and after == 0 for before, after in on_nvme[2:]), on_nvme
    engine.close()


def test_what_observes_weights_finishes_the_pending_step_first(tmp_path):
    engine = _engine(tmp_path, "swap", dtype="bf16", memory_trace=True)
    data = batches(3, seed=3)
    for x, y in data[:2]:
        engine.backward(engine(x, y))
        engine.step()
    x, y = data[2]
    observers = {"engine.state_dict": engine.state_dict, "module.state_dict": engine.module.state_dict,
                 "last_step": lambda: engine.last_step, "optimizer.state_dict": engine.optimizer.state_dict,
                 "save_checkpoint": lambda: engine.save_checkpoint(tmp_path / "ckpt"),
                 "memory_report": engine.memory_report, "no-grad forward": lambda: engine(x, y),
                 "backward": lambda: engine.backward(engine(x, y))}
    for name, observe in observers.items():
        engine.backward(engine(x, y))
        engine.step()
        engine.zero_grad()  # the gradients a pending step applies were consumed by step(): kept
        assert engine.adam.pending is not None, name
        with torch.no_grad() if name == "no-grad forward" else torch.enable_grad():
            observe()
        assert engine.adam.pending is None, name
        if name == "backward":
            engine.step()
    engine.close()
    assert engine.adam.pending is None


def test_zero_grad_drops_the_rest_of_an_interrupted_overlapped_step(tmp_path, monkeypatch):
    engine = _engine(tmp_path, "swap", dtype="bf16", step_speculation=False)  # every group in the pipeline
    data = batches(4, seed=4)
    for x, y in data[:2]:
        engine.backward(engine(x, y))
        engine.step()
    engine.backward(engine(*data[2]))
    engine.step()
    real, calls = engine.adam._step_group, {"n": 0}

    def flaky(group, grad_scale):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(5, "injected IO error")
        return real(group, grad_scale)

    monkeypatch.setattr(engine.adam, "_step_group", flaky)
    with pytest.raises(OSError, match=r"after updating 1 of \d+ chunk groups"):
        engine(*data[3])
    assert engine.adam.pending is not None and engine.adam.pending.interrupted
    engine.zero_grad()  # drops the rest, as after a synchronous step that raised
    assert engine.adam.pending is None
    assert not any(s.has_grad for s in engine.layout.slots)
    state = training_state(engine)
    for slot in engine.layout.slots:  # in-slot gradients gave the weights back: the master, rounded
        assert torch.equal(state[(slot.name, "PARAM")], state[(slot.name, "MASTER")].to(torch.bfloat16)), slot.name
    engine.backward(engine(*data[3]))
    assert engine.step()
    assert_no_pins(engine)
    engine.close()
