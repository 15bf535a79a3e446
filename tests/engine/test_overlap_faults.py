"""Faults around the optimizer step's pipeline (hetmem/step_pipeline.py), overlapped or not:
an IO error while ``engine.step()`` issues the first reads leaves a step that ``zero_grad()``
drops and ``engine.step()`` applies, exactly as an error while the groups are updated (every group
in the pipeline: ``step_speculation`` off; tests/engine/test_speculation.py has its faults)."""
from __future__ import annotations

import errno

import pytest
import torch

import hetmem
from hetmem.chunk_manager.states import ChunkKind
from tests.engine.checkpoint_state import training_state
from tests.engine.helpers import assert_no_pins, batches, config, pair

HOST = "900KiB"  # most of the state on NVMe (tests/engine/test_overlap_step.py)


def _engine(tmp_path, name: str, **overrides):
    _, model = pair(seed=5)
    return hetmem.initialize(model, config(device_budget="2304KiB", nvme_dir=str(tmp_path / name), host_budget=HOST,
                                           memory_trace=False, dtype="bf16", step_speculation=False, **overrides))


def _optimizer_state(engine) -> dict:
    """Master weights, Adam moments and step counts (the in-slot PARAM bytes hold gradients now)."""
    state = training_state(engine)
    kinds = (ChunkKind.MASTER.name, ChunkKind.EXP_AVG.name, ChunkKind.EXP_AVG_SQ.name, "step")
    return {k: v for k, v in state.items() if isinstance(k, tuple) and k[1] in kinds}


def _fail_first_reads(engine, monkeypatch) -> None:
    """The next step's first reads (``StepPipeline.issue``) raise an IO error, once."""
    pipeline, real, calls = engine.adam.pipeline, engine.adam.pipeline._read_ahead_from, {"n": 0}

    def flaky(groups, start, stop):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EIO, "injected IO error")
        return real(groups, start, stop)

    monkeypatch.setattr(pipeline, "_read_ahead_from", flaky)


@pytest.mark.parametrize("overlap", [True, False])
def test_zero_grad_drops_a_step_whose_first_reads_failed(tmp_path, monkeypatch, overlap):
    engine = _engine(tmp_path, "swap", overlap_step=overlap)
    data = batches(4, seed=4)
    for x, y in data[:2]:
        engine.backward(engine(x, y))
        engine.step()
    engine.backward(engine(*data[2]))
    before = _optimizer_state(engine)
    _fail_first_reads(engine, monkeypatch)
    with pytest.raises(OSError, match="injected"):
        engine.step()
    engine.zero_grad()  # as after an error while the groups are updated: nothing more is applied
    assert engine.adam.pending is None and engine.global_step == 2
    with torch.no_grad():
        engine(*data[3])  # would apply a step left pending
    after = _optimizer_state(engine)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value) if isinstance(value, torch.Tensor) else after[key] == value, key
    engine.backward(engine(*data[3]))
    assert engine.step()
    assert_no_pins(engine)
    engine.close()


@pytest.mark.parametrize("overlap", [True, False])
def test_step_again_applies_a_step_whose_first_reads_failed(tmp_path, monkeypatch, overlap):
    engines = {name: _engine(tmp_path, name, overlap_step=overlap) for name in ("faulty", "clean")}
    data = batches(4, seed=4)
    for engine in engines.values():
        for x, y in data[:3]:
            engine.backward(engine(x, y))
            if engine is engines["faulty"] and x is data[2][0]:
                _fail_first_reads(engine, monkeypatch)
                with pytest.raises(OSError, match="injected"):
                    engine.step()
            assert engine.step()
        engine.backward(engine(*data[3]))
        engine.step()
    expected, got = training_state(engines["clean"]), training_state(engines["faulty"])
    for key, value in expected.items():
        if isinstance(key, tuple) and key[1] != "buffer":
            assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value, key
    assert engines["faulty"].global_step == engines["clean"].global_step == 4
    for engine in engines.values():
        assert_no_pins(engine)
        engine.close()
