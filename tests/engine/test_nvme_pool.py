"""The engine's NVMe IO buffer pool and step pipeline: host payloads come from the one pool, results
are bit-identical to training without NVMe, the pipeline depth is configurable and checked."""
from __future__ import annotations

import pytest
import torch

import hetmem
from hetmem.chunk_manager.states import Tier
from hetmem.nvme.pipeline_plan import PipelinePlan, plan_pipeline
from tests.engine.helpers import batches, config, pair, train_engine

HOST = "900KiB"   # a third of the model's chunk bytes: most state lives on NVMe
TIGHT = "2304KiB"


def _engine(tmp_path, **overrides):
    _, model = pair()
    overrides.setdefault("host_budget", HOST)
    return hetmem.initialize(model, config(device_budget=TIGHT, nvme_dir=str(tmp_path / "swap"), **overrides))


def _host_payloads_in_pool(engine) -> None:
    tier = engine.manager.nvme
    for chunk in engine.manager.chunks:
        if chunk.tier is Tier.HOST and chunk.payload is not None:
            assert tier.pool.owns(chunk.payload), f"{chunk.name}'s host payload is not from the IO pool"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_host_payloads_come_from_the_one_pool_for_the_whole_run(tmp_path, dtype):
    engine = _engine(tmp_path, dtype=dtype)
    tier = engine.manager.nvme
    address, capacity = tier.pool.address, tier.pool.capacity
    takes = []
    for x, y in batches(4):
        engine.backward(engine(x, y))
        engine.step()
        _host_payloads_in_pool(engine)
        takes.append(tier.pool.takes)
        assert tier.pool.in_use <= tier.pool.capacity
    assert (tier.pool.address, tier.pool.capacity) == (address, capacity), "the pool must not be re-made"
    assert takes == sorted(takes) and takes[-1] > takes[0], "steps must take payloads from the pool"
    assert tier.outside_pool == 0
    moves = engine.manager.moved_bytes
    assert moves > 0 and engine.manager.bytes_on(Tier.NVME) > 0
    assert engine.manager.bytes_on(Tier.HOST) <= engine.budgets.host
    assert tier.buffer_stats()["kind"].startswith("aligned+prefaulted")
    engine.close()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_training_with_state_on_nvme_is_bit_identical_to_host_memory(tmp_path, dtype):
    data = batches(5)
    _, model = pair()
    in_memory = hetmem.initialize(model, config(device_budget=TIGHT, dtype=dtype))
    expected = train_engine(in_memory, data)
    results = {}
    for depth in (1, 2):
        engine = _engine(tmp_path / f"d{depth}", dtype=dtype, nvme_pipeline_depth=depth, host_budget="1200KiB")
        assert engine.adam.pipeline.read_ahead == depth == engine.nvme_plan.depth
        results[depth] = train_engine(engine, data)
        assert engine.manager.bytes_on(Tier.NVME) > 0 and engine.manager.nvme.buffer_stats()["takes"] > 0
        for (name, want), got in zip(in_memory.state_dict().items(), engine.state_dict().values()):
            assert torch.equal(want, got), f"{name} differs from training in host memory (depth {depth})"
        engine.close()
    assert results[1] == expected and results[2] == expected, (results, expected)
    in_memory.close()


def test_checkpoint_reads_and_writes_through_the_pool_are_byte_exact(tmp_path):
    engine = _engine(tmp_path, dtype="bf16")
    train_engine(engine, batches(2))
    manager = engine.manager
    on_nvme = [c for c in manager.chunks if c.tier is Tier.NVME]
    assert on_nvme
    chunk = on_nvme[0]
    plain = torch.empty(chunk.capacity, dtype=chunk.dtype)  # not a pool buffer: staged through the pool
    manager.read_copy(chunk, plain)
    new = torch.randn(chunk.capacity, generator=torch.Generator().manual_seed(3)).to(chunk.dtype)
    manager.write_from(chunk, new)
    assert chunk.tier is Tier.NVME
    back = torch.empty_like(plain)
    manager.read_copy(chunk, back)
    assert torch.equal(back, new) and not torch.equal(back, plain)
    manager.write_from(chunk, plain)  # put the bytes back: training goes on exactly
    train_engine(engine, batches(1))
    engine.close()


def test_pipeline_depth_is_checked_against_the_host_budget():
    plan = plan_pipeline(100, 1000, "auto")
    assert plan == PipelinePlan(1, 100, plan.reason) and plan.host_bytes == 300
    assert plan_pipeline(100, 1000, 3).host_groups == 5
    with pytest.raises(ValueError, match=r"keeps 11 chunk groups .* 9 read ahead: nvme_pipeline_depth=9\); raise "
                                         r"host_budget to at least 1.07 KiB, lower nvme_pipeline_depth, or lower"):
        plan_pipeline(100, 1000, 9)
    with pytest.raises(ValueError, match="too small for the NVMe pipeline: it keeps 3 chunk groups"):
        plan_pipeline(100, 250, "auto")
    for bad in (0, -1, 1.5, True, "deep"):
        with pytest.raises(ValueError, match=r"nvme_pipeline_depth=.*give 'auto'"):
            hetmem.Config(nvme_pipeline_depth=bad)


def test_a_host_budget_holding_every_chunk_group_is_never_too_small_for_the_pipeline(tmp_path):
    # the step holds at most every group: a model of one or two groups was refused a host budget
    # holding all of its chunks (and more) because the plan asked for three groups
    assert plan_pipeline(100, 250, "auto", total_bytes=200).host_groups == 3  # no refusal
    with pytest.raises(ValueError, match="raise host_budget to at least 200 B"):
        plan_pipeline(100, 150, "auto", total_bytes=200)
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256, bias=False)  # one group: 4 chunks of 256 KiB (fp32)
    engine = hetmem.initialize(model, dict(device="cpu", device_budget="2MiB", dtype="fp32", chunk_size=65536,
                                           nvme_dir=str(tmp_path / "swap"), host_budget="1MiB", memory_trace=False))
    x = torch.randn(4, 256)
    for _ in range(2):
        engine.backward(engine(x).square().mean())
        assert engine.step()
    engine.close()


def test_an_engine_names_a_depth_its_host_budget_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match=r"host_budget=900.00 KiB is too small .*nvme_pipeline_depth=40"):
        _engine(tmp_path, nvme_pipeline_depth=40)


def test_a_pool_that_cannot_be_mapped_names_host_budget(tmp_path, monkeypatch):
    import errno

    from hetmem.chunk_manager import nvme_tier

    def refuse(capacity, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(nvme_tier, "IoBufferPool", refuse)
    with pytest.raises(ValueError, match=r"NVMe IO buffer pool .* cannot be allocated .*lower host_budget"):
        _engine(tmp_path)
    assert not list((tmp_path / "swap").glob("*.swap")), "no swap file is left behind"
