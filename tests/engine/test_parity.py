"""Training with hetmem gives what plain PyTorch gives, while chunks move every step."""
from __future__ import annotations

import pytest
import torch

import hetmem
from tests.engine.helpers import (batches, config, pair, steady_steps, train_engine,
                                  train_plain)

# A budget that holds the activations of one micro-step and only part of the parameters:
# chunks are evicted and fetched again in every step.
TIGHT = "2304KiB"


def test_fp32_matches_torch_adamw_with_evictions_every_step():
    ref, model = pair(bias=True)
    data = batches(20)
    expected = train_plain(ref, data)
    engine = hetmem.initialize(model, config(device_budget=TIGHT))
    got = train_engine(engine, data)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)
    state = engine.state_dict()
    assert list(state) == list(ref.state_dict())
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-7, msg=key)
    for step in steady_steps(engine):
        assert step["evictions"], f"step {step['step']}: nothing was evicted; the budget is not tight"
        assert any(m["cause"] in ("fetch", "prefetch") for m in step["moves"])
    assert engine.scheduler.late_fetches == 0
    assert engine.scheduler.peak_total <= engine.budgets.device


def test_fp32_adam_l2_and_clipping_match_torch():
    ref, model = pair()
    data = batches(12, seed=1)
    expected = train_plain(ref, data, clip=0.05, decoupled=False, weight_decay=0.01)
    engine = hetmem.initialize(model, config(device_budget=TIGHT, gradient_clipping=0.05,
                                             optimizer=dict(lr=1e-3, weight_decay=0.01, decoupled=False)))
    got = train_engine(engine, data)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)
    assert engine.adam.last_norm > 0.05  # clipping was active
    # Adam with L2 adds weight_decay * w to the clipped gradient; where the two nearly cancel,
    # the clip coefficient's last bit (torch: fp32 multiply; hetmem: divide in the kernel) moves
    # m / sqrt(v) by a visible fraction.  Weights agree within 0.1% of one lr-sized update.
    state = engine.state_dict()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_gradient_accumulation_matches_torch():
    ref, model = pair()
    data = batches(12, seed=2)
    expected = train_plain(ref, data, accumulation=4)
    engine = hetmem.initialize(model, config(device_budget=TIGHT, gradient_accumulation_steps=4))
    got = train_engine(engine, data)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)
    assert engine.global_step == 3
    state = engine.state_dict()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_follows_fp32_curve(dtype):
    data = batches(50, seed=3)
    curves = {}
    for run in ("fp32", dtype):
        _, model = pair(seed=4)
        engine = hetmem.initialize(model, config(device_budget=TIGHT, dtype=run, gradient_clipping=1.0,
                                                 optimizer=dict(lr=1e-3, weight_decay=0.0)))
        curves[run] = torch.tensor(train_engine(engine, data))
        assert engine.scheduler.peak_total <= engine.budgets.device
    fp32, low = curves["fp32"], curves[dtype]
    assert fp32[-10:].mean() < fp32[:5].mean() * 0.8, "the fp32 run did not learn"
    rel = ((low - fp32).abs() / fp32).max().item()
    assert rel < 0.02, f"{dtype} left the fp32 loss curve by {rel:.2%}"
