"""hetmem.profile: its minimum device budget is the one that trains; less does not."""
from __future__ import annotations

import pytest
import torch

import hetmem
from tests.engine.helpers import batches, tiny_gpt, train_engine


def test_profile_reports_a_budget_that_trains_and_is_tight():
    model = tiny_gpt(checkpoint=False)
    data = batches(3)
    result = hetmem.profile(model, data[0], dtype="bf16", device="cpu")
    assert result.parameters == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert result.plain_model_bytes == result.parameters * 16
    assert result.non_model_peak > 0 and result.non_model_by_module
    assert sum(result.non_model_by_module.values()) <= result.non_model_peak * 4
    assert all(p.device.type == "cpu" and p.numel() > 0 for p in model.parameters())  # untouched

    def run(budget):  # the budget without activation offload (with it: test_activation_offload.py)
        engine = hetmem.initialize(tiny_gpt(checkpoint=False), hetmem.Config(
            device="cpu", dtype="bf16", device_budget=budget, chunk_size=result.chunk_elements,
            activation_offload="off"))
        train_engine(engine, data)
        return engine

    engine = run(result.min_device_budget)
    assert engine.scheduler.peak_total <= result.min_device_budget
    with pytest.raises(hetmem.DeviceBudgetError):
        run(int(result.min_device_budget * 0.85))
    assert "device budget needed" in result.to_text()


def test_profile_rejects_non_modules():
    with pytest.raises(ValueError, match="must be a torch.nn.Module"):
        hetmem.profile(lambda x: x, torch.zeros(1))
