"""activation_offload="auto": saved activations go to host memory so the device budget can go
below the activation peak; losses stay those of plain PyTorch and the budget holds at every
saved tensor."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import hetmem
from hetmem.accelerator import SIM_ENV
from hetmem.chunk_manager.states import Tier
from hetmem.report import validate_trace
from tests.engine.helpers import batches, config, pair, steady_steps, tiny_gpt, train_engine, train_plain
from tests.engine.test_models import Checkpointed, _train_both


def _checked(engine) -> list[int]:
    """Check the budget at every instant the scheduler measures (moments, saved tensors, restores)."""
    checks = []
    original = engine.scheduler.observe

    def checked_observe():
        total = original()
        checks.append(total)
        assert total <= engine.budgets.device, f"{total} B on the device > budget {engine.budgets.device}"
        return total

    engine.scheduler.observe = checked_observe
    engine.activations.observe = checked_observe
    return checks


def _train(engine, data):
    losses = train_engine(engine, data)
    _assert_nothing_left(engine)
    return losses


def _assert_nothing_left(engine):
    """After a step every saved activation is gone: no host bytes, nothing counted as away."""
    assert engine.activations.host_bytes == 0 and engine.activations.away == 0
    live = getattr(engine.tracer.probe, "live", None)  # the CPU probe's counter
    assert live is None or live.moved_off == 0


def _activation_steps(engine):
    return [s["activations"] for s in steady_steps(engine)]


def _assert_offloaded_and_moved(engine, last: int | None = None):
    steady = steady_steps(engine)[-last:] if last else steady_steps(engine)
    stats = [s["activations"] for s in steady]
    assert steady and all(s["offloads"] > 0 and s["restores"] > 0 for s in stats), stats
    assert all(s["late_restores"] == 0 for s in stats), stats  # the plan brought them back in time
    assert all(s["moves"] for s in steady)  # chunks moved too
    assert engine.scheduler.peak_total <= engine.budgets.device


def _between_floors(model, batch, share: float, dtype="fp32"):
    """A budget ``share`` of the way from the floor with offload to the floor without it."""
    result = hetmem.profile(model, batch, dtype=dtype, device="cpu")
    low, high = result.min_device_budget_offload, result.min_device_budget
    assert low < high
    return int(low + share * (high - low)), result


def test_gpt_trains_at_half_its_activation_peak_plus_its_largest_moment():
    ref, model = pair()
    data = batches(6)
    result = hetmem.profile(ref, data[0], dtype="fp32", device="cpu")
    largest_moment_chunks = max(m["chunk_bytes"] for m in result.moments)
    budget = result.non_model_peak // 2 + largest_moment_chunks
    engine = hetmem.initialize(model, config(device_budget=budget, chunk_size=result.chunk_elements))
    checks = _checked(engine)
    losses = _train(engine, data)
    expected = train_plain(ref, data)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=0)
    assert len(checks) > 100
    assert engine.tracer.warmups == 1
    _assert_offloaded_and_moved(engine)
    trace = engine.recorder.trace()
    validate_trace(trace)
    assert all(m["peak_total"] <= budget for s in trace["steps"] for m in s["moments"])
    summary = engine.memory_report().summary()["activations"]
    assert summary["min_device_budget_offload"] < budget < summary["min_device_budget"]
    assert "Saved activations moved to host memory and back" in engine.memory_report().to_text()
    # without activation offload the same budget cannot hold the activations
    with pytest.raises(hetmem.DeviceBudgetError):
        off = hetmem.initialize(pair()[1], config(device_budget=budget, chunk_size=result.chunk_elements,
                                                  activation_offload="off"))
        _train(off, data[:1])
    # offloaded bytes really left the device count and came back: the budget is below the peak
    assert budget < result.non_model_peak


def test_auto_offloads_nothing_when_the_budget_holds_everything():
    for budget in ("64MiB", "2304KiB"):  # everything resident / chunks evicted, activations fit
        ref, model = pair()
        data = batches(4)
        engine = hetmem.initialize(model, config(device_budget=budget))
        losses = _train(engine, data)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(train_plain(ref, data)), rtol=1e-5, atol=0)
        assert engine.activations.plan is not None and not engine.activations.plan.restore_at
        for step in engine.recorder.steps:
            assert step["activations"]["offloads"] == 0 and step["activations"]["restores"] == 0
        assert engine.activations.host_bytes == 0


def test_off_keeps_the_saved_tensors_as_before_and_bad_values_are_rejected():
    engine = hetmem.initialize(pair()[1], config(activation_offload="off"))
    assert engine.activations is None and engine.scheduler.activations is None
    with pytest.raises(ValueError, match=r"activation_offload='sometimes' is invalid: use 'auto' .* or 'off'"):
        hetmem.Config(activation_offload="sometimes")


def _train_both_below_the_floor(make_model, data, batch, step_fn=None):
    """Plain PyTorch and hetmem side by side (losses compared at every step, within 1e-5) at a
    budget 30% of the way from the floor with offload to the floor without it.  Every saved
    tensor is a measurement of the scheduler, so ``peak_total <= budget`` checks each of them."""
    torch.manual_seed(0)
    budget, result = _between_floors(make_model(), batch, 0.3)
    _, engine = _train_both(make_model, data, step_fn, device_budget=budget, chunk_size=result.chunk_elements)
    return engine


# On the simulated device the allocator sees what torch.utils.checkpoint's recomputation in
# backward keeps (weight views saved outside hetmem's hooks hold evicted chunks' memory): the
# budget is passed there, as tests/engine/test_gpu.py's RECOMPUTE_OVERSHOOT records without
# activation offload too.  Strict: the fix makes it pass and the mark goes.
RECOMPUTE_ON_SIM = pytest.mark.xfail(os.environ.get(SIM_ENV) == "sim", strict=True,
                                     reason="recomputation in backward passes the budget (allocator check)")


# reentrant recomputation runs under hetmem's saved-tensor hooks (engine.backward enters them);
# non-reentrant checkpointing keeps its recomputed tensors in its own table (torch's
# _recomputation_hook), out of their reach
@pytest.mark.parametrize("reentrant", [pytest.param(False, marks=RECOMPUTE_ON_SIM), True])
def test_activation_checkpointing_below_its_floor(reentrant):
    data = batches(4)
    engine = _train_both_below_the_floor(lambda: Checkpointed(reentrant), data, data[0])
    _assert_offloaded_and_moved(engine)


def test_hf_gpt2_below_its_floor():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    data = batches(5)
    engine = _train_both_below_the_floor(lambda: transformers.GPT2LMHeadModel(cfg), data,
                                         {"input_ids": data[0][0], "labels": data[0][0]},
                                         step_fn=lambda m, x, y: m(input_ids=x, labels=x).loss)
    assert engine.tracer.warmups == 1
    _assert_offloaded_and_moved(engine)


def test_accumulation_no_grad_forwards_and_new_shapes():
    ref, model = pair()
    data = batches(6)
    budget, result = _between_floors(ref, data[0], 0.3)
    engine = hetmem.initialize(model, config(device_budget=budget, chunk_size=result.chunk_elements,
                                             gradient_accumulation_steps=2))
    _checked(engine)
    losses = []
    for i, (x, y) in enumerate(data):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if i == 3:
            with torch.no_grad():  # an evaluation forward between steps changes nothing
                engine(x, y)
    expected = train_plain(ref, data, accumulation=2)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=0)
    assert engine.tracer.warmups == 1
    _assert_offloaded_and_moved(engine)
    # shorter sequences: a new warm-up and a new plan, still within the budget
    short = batches(3, block_size=16, seed=1)
    _train(engine, short)
    assert engine.tracer.warmups == 2
    assert engine.scheduler.peak_total <= engine.budgets.device
    assert all(c.pins == 0 for c in engine.manager.chunks)
    resident = sum(c.nbytes for c in engine.manager.chunks if c.tier is Tier.DEVICE)
    assert resident == engine.manager.bytes_on(Tier.DEVICE)


def test_profile_floor_with_offload_is_under_40_percent_at_sequence_512_and_trains():
    model = tiny_gpt(block_size=512, d_model=32, n_head=2, n_layer=4)
    data = batches(3, batch_size=1, block_size=512)
    result = hetmem.profile(model, data[0], dtype="fp32", device="cpu")
    assert result.min_device_budget_offload <= 0.4 * result.min_device_budget, result.to_text()
    assert "with activation offload: device budget needed" in result.to_text()
    # the reported floor trains
    engine = hetmem.initialize(copy.deepcopy(model), config(device_budget=result.min_device_budget_offload,
                                                            chunk_size=result.chunk_elements))
    losses = _train(engine, data)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(train_plain(copy.deepcopy(model), data)),
                               rtol=1e-5, atol=0)
    assert engine.scheduler.peak_total <= result.min_device_budget_offload
    assert all(s["offloads"] > 0 for s in _activation_steps(engine))


def test_a_failing_forward_leaves_no_activation_behind_and_training_goes_on():
    ref, model = pair()
    data = batches(5)
    budget, result = _between_floors(ref, data[0], 0.3)
    engine = hetmem.initialize(model, config(device_budget=budget, chunk_size=result.chunk_elements))
    fail = [False]

    def maybe_fail(module, args, output):
        if fail[0]:
            raise RuntimeError("injected")

    engine.module.blocks[2].mlp.register_forward_hook(maybe_fail)
    losses = _train(engine, data[:3])
    fail[0] = True
    with pytest.raises(RuntimeError, match="injected"):
        engine(*data[3])
    fail[0] = False
    _assert_nothing_left(engine)
    losses += _train(engine, data[3:])
    expected = train_plain(ref, data)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=0)
    _assert_offloaded_and_moved(engine, last=1)


def test_offloaded_activations_count_against_host_budget(caplog):
    ref, model = pair()
    data = batches(2)
    budget, result = _between_floors(ref, data[0], 0.3)
    settings = dict(device_budget=budget, chunk_size=result.chunk_elements)
    probe = hetmem.initialize(copy.deepcopy(model), config(**settings))
    chunk_bytes = sum(c.nbytes for c in probe.manager.chunks if c.tier is not None)
    # room for the chunks and not for the activations the budget needs moved: it cannot train
    engine = hetmem.initialize(model, config(host_budget=chunk_bytes, **settings))
    with pytest.raises(hetmem.DeviceBudgetError, match="device budget exhausted"):
        _train(engine, data)
    assert "host_budget is full: saved activations stay on the device" in caplog.text
    # room for both: it trains, and the host bytes stayed within host_budget
    engine = hetmem.initialize(pair()[1], config(host_budget=chunk_bytes + (1 << 20), **settings))
    peak_host = [0]
    original = engine.activations.host_room

    def host_room(nbytes):
        fits = original(nbytes)
        if fits:
            used = engine.manager.bytes_on(Tier.HOST) + engine.activations.host_bytes + nbytes
            peak_host[0] = max(peak_host[0], used)
        return fits

    engine.activations.host_room = host_room
    _train(engine, data)
    assert 0 < peak_host[0] <= chunk_bytes + (1 << 20)
    assert all(s["offloads"] > 0 for s in _activation_steps(engine))
