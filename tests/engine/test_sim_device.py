"""The review's GPU findings, each reproduced on the simulated asynchronous device
(hetmem/accelerator/sim.py), which behaves like a GPU where synchronisation bugs hide."""
from __future__ import annotations

import pytest
import torch

import hetmem
from hetmem.accelerator import SIM_ENV
from hetmem.accelerator.sim import DELAY_ENV, SimAccelerator
from hetmem.chunk_manager.states import ChunkKind, Tier
from tests.engine.helpers import batches, config, pair, tiny_gpt, train_engine, train_plain

TIGHT = "2304KiB"  # as in test_parity: chunks move every step


@pytest.fixture
def sim(monkeypatch):
    monkeypatch.setenv(SIM_ENV, "sim")


def test_the_sim_device_is_what_cpu_resolves_to_under_the_test_switch(sim):
    _, model = pair()
    engine = hetmem.initialize(model, config(device_budget=TIGHT))
    assert isinstance(engine.accelerator, SimAccelerator) and engine.accelerator.separate_memory
    engine.close()


def test_a_new_warmup_after_everything_fits_keeps_the_optimizer_operands_together(sim):
    """Everything fits (all chunks on the device, the optimizer there), then a larger batch
    warms up again: gradients go to GRAD chunks in host memory while master weights and Adam
    states were on the device.  The update must not mix devices (the simulated device raises
    where a GPU would)."""
    _, model = pair()
    engine = hetmem.initialize(model, config(device_budget="64MiB", dtype="bf16"))
    first = train_engine(engine, batches(3, batch_size=2))
    assert engine.all_resident
    assert engine.tracer.warmups == 1
    second = train_engine(engine, batches(4, batch_size=4, seed=1))  # new shapes: warm-up again
    assert engine.tracer.warmups == 2
    assert engine.all_resident                                       # it fits again afterwards
    assert all(c.tier is Tier.DEVICE for c in engine.manager.chunks if c.tier is not None)
    losses = torch.tensor(first + second)
    assert torch.isfinite(losses).all()
    assert losses[-1] < losses[0]


def test_the_step_after_a_new_warmup_matches_the_host_device(monkeypatch):
    """Same run, simulated device vs host device: same losses (the update order is the same;
    on-device Adam and the CPU kernel agree to rounding)."""
    runs = {}
    for device in ("host", "sim"):
        if device == "sim":
            monkeypatch.setenv(SIM_ENV, "sim")
        _, model = pair()
        engine = hetmem.initialize(model, config(device_budget="64MiB", dtype="bf16"))
        losses = train_engine(engine, batches(3, batch_size=2)) + train_engine(engine, batches(3, batch_size=4, seed=1))
        runs[device] = torch.tensor(losses)
        engine.close()
    torch.testing.assert_close(runs["sim"], runs["host"], rtol=2e-2, atol=0)


def test_gradient_offload_does_not_sync_the_host_per_parameter(monkeypatch):
    """fp32 under a tight budget: gradients go to GRAD chunks in host memory.  They are copied on
    the copy stream, so backward returns with copies still in flight; the step waits for them
    and the result is torch's."""
    monkeypatch.setenv(SIM_ENV, "sim")
    monkeypatch.setenv(DELAY_ENV, "20")       # copies land up to 20 ms late
    ref, model = pair(bias=True)
    data = batches(4)
    expected = train_plain(ref, data)
    engine = hetmem.initialize(model, config(device_budget=TIGHT))
    in_flight_after_backward = []
    losses = []
    for x, y in data:
        loss = engine(x, y)
        engine.backward(loss)
        grads = [g.chunks[ChunkKind.GRAD] for g in engine.layout.groups if g.trainable]
        assert all(c.tier is Tier.HOST for c in grads)
        in_flight_after_backward.append(sum(1 for c in grads if c.transfer is not None and not c.transfer.done()))
        engine.step()
        losses.append(loss.item())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=0)
    state = engine.state_dict()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert all(n > 0 for n in in_flight_after_backward), in_flight_after_backward


def test_the_users_peak_statistics_are_left_alone(sim):
    _, model = pair()
    engine = hetmem.initialize(model, config(device_budget=TIGHT))
    accelerator = engine.accelerator
    x, y = batches(1)[0]
    loss = engine(x, y)
    high = accelerator.memory_allocated()      # all activations held: the step's high point
    engine.backward(loss)
    engine.step()
    train_engine(engine, batches(3, seed=2))
    assert accelerator.max_memory_allocated() >= high  # hetmem reset nothing
    assert engine.tracer.store.peak_non_model > 0      # and still measured the activations


class _MarginSim(SimAccelerator):
    """The simulated device with an allocator margin like a GPU's (max(64 KiB, 5%), scaled down)."""

    def margin(self, device_budget):
        return max(64 << 10, int(device_budget * 0.05))

    def budget_for(self, need):
        return max(need + (64 << 10), int(need / 0.95) + 1)


def test_the_profilers_budget_uses_the_engines_margin(monkeypatch):
    """``hetmem.profile`` on a device with an allocator margin: its minimum budget trains there
    (the engine takes the same margin off it) and 15% less does not."""
    monkeypatch.setattr("hetmem.accelerator.resolve", lambda wanted: _MarginSim())
    monkeypatch.setattr("hetmem.device.resolve", lambda wanted: _MarginSim())
    model = tiny_gpt(checkpoint=False)
    data = batches(3)
    result = hetmem.profile(model, data[0], dtype="bf16", device="cpu")

    def run(budget):
        engine = hetmem.initialize(tiny_gpt(checkpoint=False), hetmem.Config(
            device="cpu", dtype="bf16", device_budget=budget, chunk_size=result.chunk_elements,
            activation_offload="off"))  # the floor without offload (with it: test_activation_offload.py)
        assert engine.budgets.margin == max(64 << 10, int(budget * 0.05))
        train_engine(engine, data)
        return engine

    engine = run(result.min_device_budget)
    assert engine.scheduler.peak_total <= result.min_device_budget - engine.budgets.margin
    with pytest.raises(hetmem.DeviceBudgetError):
        run(int(result.min_device_budget * 0.85))
