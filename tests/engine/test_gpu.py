"""CUDA paths: the budget checked against torch.cuda.max_memory_allocated, parity on the GPU,
pinned host chunks, on-device optimizer for resident groups.  Skipped without CUDA."""
from __future__ import annotations

import copy

import pytest
import torch

import hetmem
from hetmem.chunk_manager.states import Tier
from tests.engine.helpers import batches, tiny_gpt, train_engine

pytestmark = pytest.mark.gpu


def _cuda_batches(n, **kw):
    return [(x.cuda(), y.cuda()) for x, y in batches(n, **kw)]


def test_budget_holds_against_the_cuda_allocator():
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    model = tiny_gpt(n_layer=6, d_model=256)
    budget = 24 << 20
    engine = hetmem.initialize(model, hetmem.Config(device="cuda", device_budget=budget, dtype="bf16",
                                                    chunk_size=1 << 16))
    train_engine(engine, _cuda_batches(6, batch_size=8, block_size=32))
    torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated() - baseline
    assert used <= budget, f"the CUDA allocator saw {used} B, the budget is {budget} B"
    assert engine.scheduler.peak_total <= budget
    assert any(s["evictions"] for s in engine.recorder.steps if not s["warmup"])


def test_fp32_parity_on_the_gpu():
    ref = tiny_gpt().cuda()
    model = copy.deepcopy(ref)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    engine = hetmem.initialize(model, hetmem.Config(device="cuda", device_budget="3MiB", dtype="fp32",
                                                    chunk_size=8192, gradient_clipping=None,
                                                    optimizer=dict(lr=1e-3, weight_decay=0.1)))
    for x, y in _cuda_batches(8):
        expected = ref(x, y)
        expected.backward()
        opt.step()
        opt.zero_grad()
        got = engine(x, y)
        engine.backward(got)
        engine.step()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)


def test_host_chunks_are_pinned_and_resident_groups_step_on_the_device():
    engine = hetmem.initialize(tiny_gpt(), hetmem.Config(device="cuda", device_budget="256MiB", dtype="bf16"))
    host = [c for c in engine.manager.chunks if c.tier is Tier.HOST]
    assert host and all(c.payload.is_pinned() for c in host)
    train_engine(engine, _cuda_batches(3))
    assert engine.all_resident
    assert all(c.payload.is_cuda for c in engine.manager.chunks if c.tier is not None)
