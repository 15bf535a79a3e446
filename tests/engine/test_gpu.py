"""GPU paths: the budget against the allocator's own peak over the whole run, fp16 and bf16,
activation checkpointing, NVMe, parity, pinned host chunks, the on-device optimizer, and a new
warm-up after everything fit.

Each test runs on CUDA (marked ``gpu``: skipped without one) and on the simulated asynchronous
device (hetmem/accelerator/sim.py), which has the GPU's asynchronous copies and allocator
statistics but not its speed."""
from __future__ import annotations

import copy

import pytest
import torch

import hetmem
from hetmem.accelerator import SIM_ENV
from hetmem.chunk_manager.states import Tier
from tests.engine.helpers import batches, tiny_gpt, train_engine


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "sim"])
def device(request, monkeypatch):
    """The Config.device for the run: "cuda", or "cpu" resolved to the simulated device."""
    if request.param == "sim":
        monkeypatch.setenv(SIM_ENV, "sim")
        return "cpu"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # the test is the user: its peak covers the whole run
    return "cuda"


def _on_device(engine, payload) -> bool:
    accelerator = engine.accelerator
    if accelerator.name == "sim":
        return accelerator.is_device_buffer(payload)
    return payload.device.type == accelerator.device.type


# Found by the simulated device's allocator check: with activation checkpointing, a steady step's
# allocator peak passes the budget (by ~390 KiB at 8 MiB before chunk tails were trimmed; by ~510
# KiB at 7 MiB now, in backward's recomputation), which hetmem's own accounting
# (scheduler.peak_total) does not see.  Whether it shows depends on where the budget's boundary
# falls between moments: with trimmed chunks it does at 5, 7 and 8.5 MiB and not at 6, 7.5 or 8.
# Reported to the lead.
RECOMPUTE_OVERSHOOT = pytest.mark.xfail(strict=True, reason="recomputed activations pass the budget "
                                                            "(allocator check)")


@pytest.mark.parametrize("dtype,checkpoint", [("bf16", False), ("fp16", False),
                                              pytest.param("bf16", True, marks=RECOMPUTE_OVERSHOOT)])
def test_budget_holds_against_the_allocators_peak_after_the_warmup(device, dtype, checkpoint):
    model = tiny_gpt(n_layer=6, d_model=256, checkpoint=checkpoint)
    budget = (7 if checkpoint else 20) << 20          # both evict every step (24 MiB without: all fits)
    engine = hetmem.initialize(model, hetmem.Config(device=device, device_budget=budget, dtype=dtype,
                                                    chunk_size=1 << 16))
    accelerator = engine.accelerator
    data = batches(6, batch_size=8, block_size=32)
    losses = train_engine(engine, data[:1])          # the warm-up: see the test below
    accelerator.synchronize()
    accelerator.reset_peak_memory_stats()            # the test is the user: from here to the end
    losses += train_engine(engine, data[1:])
    accelerator.synchronize()
    used = accelerator.max_memory_allocated()        # never reset by hetmem: every step after the warm-up
    assert used <= budget, f"the allocator saw {used} B, the budget is {budget} B"
    assert engine.scheduler.peak_total <= budget
    assert any(s["evictions"] for s in engine.recorder.steps if not s["warmup"])
    assert all(loss == loss for loss in losses)  # NaN fails


# Found by the simulated device's allocator check: in the first warm-up the chunks of the whole
# forward stay resident while the activations arrive (those of the loss come after the model's
# last hooked module), and the allocator's peak passes the budget (by ~330 KiB at 20 MiB here; at
# 24 MiB the trimmed chunks all fit and nothing is evicted) before hetmem evicts.  Reported to the
# lead; strict, so the fix makes it pass and the mark goes.
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="the first warm-up passes the budget transiently (allocator check)")
def test_budget_holds_in_the_first_warmup_too(device):
    engine = hetmem.initialize(tiny_gpt(n_layer=6, d_model=256), hetmem.Config(
        device=device, device_budget=20 << 20, dtype="bf16", chunk_size=1 << 16))
    baseline = engine.accelerator.memory_allocated()
    train_engine(engine, batches(1, batch_size=8, block_size=32))
    engine.accelerator.synchronize()
    if not any(s["evictions"] for s in engine.recorder.steps):  # not the expected failure: fails the test
        pytest.fail("the warm-up evicted nothing: the budget no longer tests the case, lower it")
    assert engine.accelerator.max_memory_allocated() - baseline <= 20 << 20


def test_fp32_parity_on_the_device(device):
    ref = tiny_gpt()
    model = copy.deepcopy(ref)
    engine = hetmem.initialize(model, hetmem.Config(device=device, device_budget="2304KiB", dtype="fp32",
                                                    chunk_size=8192, gradient_clipping=None,
                                                    optimizer=dict(lr=1e-3, weight_decay=0.1)))
    ref = ref.to(engine.device)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    for x, y in batches(8):
        x, y = x.to(engine.device), y.to(engine.device)
        expected = ref(x, y)
        expected.backward()
        opt.step()
        opt.zero_grad()
        got = engine(x, y)
        engine.backward(got)
        engine.step()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)
    assert any(s["evictions"] for s in engine.recorder.steps if not s["warmup"])


def test_host_chunks_are_pinned_and_resident_groups_step_on_the_device(device):
    engine = hetmem.initialize(tiny_gpt(), hetmem.Config(device=device, device_budget="256MiB", dtype="bf16"))
    host = [c for c in engine.manager.chunks if c.tier is Tier.HOST]
    assert host
    if engine.accelerator.pin_host:
        assert all(c.payload.is_pinned() for c in host)
    train_engine(engine, batches(3))
    assert engine.all_resident
    assert all(_on_device(engine, c.payload) for c in engine.manager.chunks if c.tier is not None)


def test_a_new_warmup_after_everything_fit(device):
    engine = hetmem.initialize(tiny_gpt(), hetmem.Config(device=device, device_budget="256MiB", dtype="bf16",
                                                         gradient_clipping=1.0))
    first = train_engine(engine, batches(3, batch_size=2))
    assert engine.all_resident
    second = train_engine(engine, batches(3, batch_size=4, seed=1))  # new shapes: warm-up again
    assert engine.tracer.warmups == 2 and engine.all_resident
    losses = torch.tensor(first + second)
    assert torch.isfinite(losses).all() and losses[-1] < losses[0]


def test_nvme_tier_on_the_device(device, tmp_path):
    engine = hetmem.initialize(tiny_gpt(n_layer=4, d_model=128), hetmem.Config(
        device=device, device_budget="4MiB", dtype="bf16", chunk_size=1 << 14, host_budget="6MiB",
        nvme_dir=str(tmp_path)))
    losses = train_engine(engine, batches(4))
    assert engine.manager.bytes_on(Tier.NVME) > 0
    assert engine.scheduler.peak_total <= engine.budgets.device
    assert torch.isfinite(torch.tensor(losses)).all() and losses[-1] < losses[0]
