"""The device budget is a promise: chunk + non-model bytes never above it, at every moment."""
from __future__ import annotations

import pytest
import torch

import hetmem
from hetmem.chunk_manager.states import Tier
from hetmem.report import validate_trace
from tests.engine.helpers import batches, config, pair, train_engine


@pytest.mark.parametrize("dtype,budget,checkpointing", [
    ("fp32", "2304KiB", False), ("bf16", "1280KiB", False), ("fp16", "1280KiB", False),
    ("bf16", "640KiB", True),
])
def test_budget_holds_at_every_moment_and_saved_tensor(dtype, budget, checkpointing):
    _, model = pair(checkpoint=checkpointing)
    engine = hetmem.initialize(model, config(device_budget=budget, dtype=dtype, chunk_size=4096))
    checks = []
    original = engine.scheduler.observe

    def checked_observe():  # every instant the scheduler measures: moments, fetches, saved tensors
        total = original()
        checks.append(total)
        assert total <= engine.budgets.device, f"{total} B on the device > budget {engine.budgets.device}"
        return total

    engine.scheduler.observe = checked_observe
    train_engine(engine, batches(6))
    assert len(checks) > 100
    trace = engine.memory_report().summary()
    assert trace["peaks"]["device"]["peak_bytes"] <= engine.budgets.device
    for step in engine.recorder.trace()["steps"]:
        for moment in step["moments"]:
            assert moment["peak_total"] <= engine.budgets.device
            chunks = sum(v for k, v in moment["device"].items() if k != "non_model")
            assert chunks <= engine.budgets.device
    # accounting agrees with what is actually resident
    resident = sum(c.nbytes for c in engine.manager.chunks if c.tier is Tier.DEVICE)
    assert resident == engine.manager.bytes_on(Tier.DEVICE)
    validate_trace(engine.recorder.trace())


def test_steady_state_follows_schedule_without_late_fetches_and_prefetches():
    _, model = pair()
    engine = hetmem.initialize(model, config(device_budget="2304KiB"))
    train_engine(engine, batches(5))
    assert engine.tracer.warmups == 1
    assert engine.scheduler.late_fetches == 0
    steady = [s for s in engine.recorder.steps if not s["warmup"]]
    assert any(m["cause"] == "prefetch" for s in steady for m in s["moves"])
    reasons = [e["reason"] for s in steady for e in s["evictions"]]
    assert reasons and all(r.startswith("Belady") for r in reasons)
    warm = [e["reason"] for s in engine.recorder.steps if s["warmup"] for e in s["evictions"]]
    assert all(r.startswith("LRU") for r in warm)


def test_new_input_shape_triggers_a_new_warmup_and_stays_in_budget():
    _, model = pair()
    engine = hetmem.initialize(model, config(device_budget="3MiB"))
    train_engine(engine, batches(3, batch_size=2))
    assert engine.tracer.warmups == 1
    train_engine(engine, batches(3, batch_size=4))  # twice the activations
    assert engine.tracer.warmups == 2
    assert "non-model peak" in engine.tracer.stale_reason
    assert engine.scheduler.peak_total <= engine.budgets.device


def test_model_fits_whole_nothing_moves_after_warmup():
    _, model = pair()
    engine = hetmem.initialize(model, config(device_budget="64MiB"))
    train_engine(engine, batches(4))
    steady = [s for s in engine.recorder.steps if not s["warmup"]]
    assert steady and all(not s["moves"] and not s["evictions"] for s in steady)
    assert engine.all_resident
    assert all(c.tier is Tier.DEVICE for c in engine.manager.chunks if c.tier is not None)
    assert engine.manager.bytes_on(Tier.HOST) == 0
    assert engine.scheduler.peak_total <= engine.budgets.device


def test_report_numbers_match_the_engine_accounting():
    _, model = pair()
    engine = hetmem.initialize(model, config(device_budget="2304KiB", dtype="bf16"))
    train_engine(engine, batches(4))
    report = engine.memory_report()
    summary = report.summary()
    step = next(s for s in engine.recorder.trace()["steps"] if s["step"] == summary["step"])
    assert summary["peaks"]["device"]["peak_bytes"] == max(m["peak_total"] for m in step["moments"])
    moved = sum(m["bytes"] for m in step["moves"])
    assert summary["moved"]["total_bytes"] == moved
    # model data bytes equal the exact chunk sizes of a known layout
    chunk_bytes = sum(c.nbytes for c in engine.manager.chunks if c.tier is not None)
    host = summary["peaks"]["host"]["max"]["model"]
    assert host <= chunk_bytes
    text = report.to_text()
    assert "Peak memory per tier" in text


def test_errors_are_raised_before_training_with_the_fix():
    _, model = pair()
    with pytest.raises(ValueError, match=r"cannot hold module 'wte'.*raise device_budget"):
        hetmem.initialize(model, config(device_budget="40KiB", chunk_size=4096 * 16))
    _, model = pair()
    with pytest.raises(ValueError, match=r"unknown config key 'device_budgit'; did you mean 'device_budget'"):
        hetmem.initialize(model, {"device": "cpu", "device_budgit": "1GiB"})
    with pytest.raises(ValueError, match=r"model must be a torch.nn.Module, got function"):
        hetmem.initialize(lambda x: x, config())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda' but CUDA is not available"):
            hetmem.initialize(pair()[1], config(device="cuda"))
    with pytest.raises(ValueError, match=r"host_budget=.* too small .* set nvme_dir"):
        hetmem.initialize(pair()[1], config(host_budget="1MiB"))


def test_activations_too_large_for_the_budget_fail_in_warmup_without_touching_weights():
    # (with activation_offload="auto" this budget trains: tests/engine/test_activation_offload.py)
    ref, model = pair()
    engine = hetmem.initialize(model, config(device_budget="600KiB", chunk_size=4096, activation_offload="off"))
    before = engine.state_dict()
    x, y = batches(1)[0]
    with pytest.raises(hetmem.DeviceBudgetError, match="device budget exhausted.*raise device_budget"):
        engine.backward(engine(x, y))
    after = engine.state_dict()
    for key in before:
        assert torch.equal(before[key], after[key])
    # a smaller batch still trains on the same engine
    x2, y2 = batches(1, batch_size=1, block_size=8)[0]
    engine.backward(engine(x2, y2))
    assert engine.step()
