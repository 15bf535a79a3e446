"""The optimizer update during backward (hetmem/speculation.py) is exact whatever happens
between ``engine.backward()`` and ``engine.step()``.

Each test runs an engine with ``step_speculation=True`` beside the synchronous one
(``overlap_step=False``) on the same model and batches, state on NVMe with budgets that move
chunks every step, and compares every chunk's bytes and step count (``torch.equal``, ``==``).
It also asserts that speculation really ran (groups updated during backward) and, where the
test makes the step differ, that it was rolled back.
"""
from __future__ import annotations

import errno

import pytest
import torch

import hetmem
from hetmem.chunk_manager.states import Tier
from hetmem.speculation import Speculation
from tests.engine.checkpoint_state import training_state
from tests.engine.helpers import FailingStore, assert_no_pins, batches, config, pair

HOST = "900KiB"  # a third of the model's chunk bytes (tests/engine/test_overlap_step.py)


@pytest.fixture(autouse=True)
def _deterministic(monkeypatch):
    """Complete groups wait for their state: what is speculated does not depend on the disk's
    timing (tests/engine/test_overlap_step.py runs the non-blocking default)."""
    monkeypatch.setattr(Speculation, "blocking", True)


def _engine(tmp_path, name: str, speculate: bool, **overrides):
    _, model = pair(seed=5)
    overrides.setdefault("dtype", "bf16")
    return hetmem.initialize(model, config(device_budget="2304KiB", nvme_dir=str(tmp_path / name), host_budget=HOST,
                                           memory_trace=False, overlap_step=speculate, step_speculation=speculate,
                                           **overrides))


def _pair(tmp_path, **overrides):
    return _engine(tmp_path, "sync", False, **overrides), _engine(tmp_path, "spec", True, **overrides)


def _assert_same_state(expected_engine, engine) -> None:
    expected, got = training_state(expected_engine), training_state(engine)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        if isinstance(key, tuple) and key[1] != "buffer":
            assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value, key
    for engine in (expected_engine, engine):
        assert engine.manager.bytes_on(Tier.NVME) > engine.manager.bytes_on(Tier.HOST)  # state lived on NVMe
        assert_no_pins(engine)


def _train(engine, data, bad_step: int | None = None, scheduler=None) -> list[float]:
    losses = []
    for i, (x, y) in enumerate(data):
        loss = engine(x, y)
        losses.append(loss.item())
        engine.backward(loss * float("inf") if i == bad_step else loss)
        assert engine.step()
        if scheduler is not None:
            scheduler.step()  # after engine.step(): the next backward's speculation reads its rate
        assert engine.last_step.skipped is (i == bad_step)
    return losses


def _scheduler(engine):
    return torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda step: 1.0 / (1.0 + step))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_skipped_step_rolls_back_exactly_with_a_scheduler_within_the_host_budget(tmp_path, monkeypatch, dtype):
    sync, spec = _pair(tmp_path, dtype=dtype)
    host_peak = []
    moment = Speculation.on_moment

    def watched(self):
        moment(self)
        host_peak.append(self.manager.bytes_on(Tier.HOST))

    monkeypatch.setattr(Speculation, "on_moment", watched)
    data = batches(8, seed=11)
    assert (_train(spec, data, bad_step=5, scheduler=_scheduler(spec))
            == _train(sync, data, bad_step=5, scheduler=_scheduler(sync)))
    assert spec.optimizer.param_groups[0]["lr"] == sync.optimizer.param_groups[0]["lr"] < 1e-3
    stats = spec.adam.speculation.stats()
    assert stats["speculated_groups"] > 0 and stats["rolled_back_groups"] > 0, stats  # the inf step's
    _assert_same_state(sync, spec)
    assert host_peak and max(host_peak) <= spec.manager.host_limit
    for engine in (sync, spec):
        engine.close()


def _between_backward_and_step(tmp_path, seed: int):
    """Both engines after two steps and the third backward (speculation updated groups in it)."""
    sync, spec = _pair(tmp_path)
    data = batches(4, seed=seed)
    for engine in (sync, spec):
        _train(engine, data[:2])
        engine.backward(engine(*data[2]))
    assert spec.adam.speculation.records  # some groups were updated during that backward
    return sync, spec, data


def _observers(engine, x, y, folder):
    return {"state_dict": engine.state_dict, "save_checkpoint": lambda: engine.save_checkpoint(folder),
            "no-grad forward": lambda: torch.no_grad()(engine)(x, y), "second backward": lambda: engine.backward(engine(x, y))}


def _rolled_back_then_trains_on(sync, spec, data) -> None:
    """``spec``'s speculation was rolled back to ``sync``'s state; both then train identically."""
    assert not spec.adam.speculation.records and spec.adam.speculation.stats()["rolled_back_groups"] > 0
    _assert_same_state(sync, spec)
    for engine in (sync, spec):
        _train(engine, data)
    _assert_same_state(sync, spec)
    for engine in (sync, spec):
        engine.close()


@pytest.mark.parametrize("observer", ["zero_grad", "state_dict", "save_checkpoint", "no-grad forward", "second backward"])
def test_what_reads_the_state_before_step_sees_it_from_before_the_update(tmp_path, observer):
    """bf16 keeps gradients in the parameters' slots, which the update overwrites: an observer
    gets the state from before (rolled back exactly) and the next step raises, dropping the
    step, as ``zero_grad()`` on the synchronous engine does; training then goes on identically."""
    sync, spec, data = _between_backward_and_step(tmp_path, seed=3)
    if observer == "zero_grad":
        spec.zero_grad()
        assert spec.step() is False
    else:
        seen = _observers(spec, *data[2], tmp_path / "ckpt")[observer]()
        if observer == "state_dict":
            reference = sync.state_dict()
            assert all(torch.equal(seen[k], v) for k, v in reference.items())
        with pytest.raises(RuntimeError, match="step_speculation=False"):
            spec.step()
        assert spec.step() is False  # the step was dropped: nothing left to apply
    sync.zero_grad()
    _rolled_back_then_trains_on(sync, spec, data[3:])


def test_fp32_gradients_outlive_the_update_so_a_late_change_is_redone(tmp_path):
    """fp32 keeps gradients in GRAD chunks: a second backward before the step and a learning
    rate set after backward roll the speculated groups back and the step redoes them."""
    sync, spec = _pair(tmp_path, dtype="fp32")
    data = batches(5, seed=4)
    for engine in (sync, spec):
        _train(engine, data[:2])
        engine.backward(engine(*data[2]))
        engine.backward(engine(*data[3]))  # two backwards, one step: the gradients add up
        assert engine.step()
        engine.backward(engine(*data[4]))
        engine.optimizer.param_groups[0]["lr"] *= 0.5  # after backward, before step
        assert engine.step()
    assert spec.adam.speculation.stats()["rolled_back_groups"] > 0
    _assert_same_state(sync, spec)
    for engine in (sync, spec):
        engine.close()


def test_a_learning_rate_set_between_backward_and_step_in_bf16_raises(tmp_path):
    sync, spec, data = _between_backward_and_step(tmp_path, seed=4)
    spec.optimizer.param_groups[0]["lr"] *= 0.5
    with pytest.raises(RuntimeError, match="param_groups changed between engine.backward.. and engine.step"):
        spec.step()
    sync.zero_grad()
    sync.optimizer.param_groups[0]["lr"] *= 0.5
    _assert_same_state(sync, spec)
    for engine in (sync, spec):
        _train(engine, data[3:])  # a scheduler's usual place, after step(), is exact
        engine.optimizer.param_groups[0]["lr"] *= 0.9
        _train(engine, data[3:])
    _assert_same_state(sync, spec)
    for engine in (sync, spec):
        engine.close()


def test_an_io_error_during_speculation_leaves_the_rest_to_the_step(tmp_path, monkeypatch, caplog):
    sync, spec = _pair(tmp_path)
    data = batches(5, seed=6)
    real, calls = spec.adam._step_group, {"n": 0}

    def flaky(group, grad_scale):
        if spec.adam.speculation.in_backward:
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.EIO, "injected IO error")
        return real(group, grad_scale)

    monkeypatch.setattr(spec.adam, "_step_group", flaky)
    assert _train(spec, data) == _train(sync, data)
    assert calls["n"] > 3 and "stopped by an IO error" in caplog.text
    stats = spec.adam.speculation.stats()
    assert stats["speculated_groups"] > 0 and stats["rolled_back_groups"] == 0, stats  # the failed group: not counted
    _assert_same_state(sync, spec)
    for engine in (sync, spec):
        engine.close()


def test_a_failed_write_back_of_a_speculated_group_is_rolled_back_exactly(tmp_path, monkeypatch):
    """The speculated groups' write-backs fail during backward: backward raises the IO error (as
    any failed transfer it meets), the speculation is rolled back although the bytes it drops
    never landed (a fuzz-found case: the rollback re-raised the write's error), and the engine
    trains on exactly like the synchronous one whose backward was dropped."""
    sync, spec = _pair(tmp_path)
    data = batches(4, seed=3)
    for engine in (sync, spec):
        _train(engine, data[:2])
    tier = spec.manager.nvme
    real_store = tier.store

    def store(chunk, payload):  # the speculated state's writes (to shadow blobs) fail
        request = real_store(chunk, payload)
        return FailingStore(request) if tier.speculative(chunk) else request

    monkeypatch.setattr(tier, "store", store)
    with pytest.raises(OSError, match="injected write error"):
        spec.backward(spec(*data[2]))
    monkeypatch.setattr(tier, "store", real_store)
    sync.backward(sync(*data[2]))
    sync.zero_grad()
    spec.zero_grad()
    _rolled_back_then_trains_on(sync, spec, data[3:])


@pytest.mark.parametrize("value,match", [("yes", "use 'auto'"), (1, "use 'auto'")])
def test_step_speculation_values_are_checked(value, match):
    with pytest.raises(ValueError, match=f"step_speculation.*{match}"):
        config(step_speculation=value, nvme_dir="/tmp/unused")


@pytest.mark.parametrize("overrides,missing", [({"overlap_step": False, "nvme_dir": "/tmp/x"}, "overlap_step=true"),
                                               ({}, "nvme_dir set"),
                                               ({"gradient_accumulation_steps": 2, "nvme_dir": "/tmp/x"},
                                                "gradient_accumulation_steps=1")])
def test_step_speculation_true_says_what_it_needs(overrides, missing):
    with pytest.raises(ValueError, match=f"step_speculation.*{missing}"):
        config(step_speculation=True, **overrides)
