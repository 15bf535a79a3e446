"""The RSS breakdown arithmetic and the /proc readers of benchmarks/memory_accounting.py."""
from __future__ import annotations

import pytest
import torch

import hetmem
from hetmem.benchmarks import memory_accounting as acc
from hetmem.chunk_manager.states import ChunkKind, Tier


def test_breakdown_adds_up_exactly():
    b = acc.rss_breakdown(1000, 200, {"chunks.param": 300, "chunks.master": 400})
    assert b["accounted"] == 700
    assert b["unaccounted"] == 100
    assert b["overhead_ratio"] == 800 / 700
    assert b["baseline"] + b["accounted"] + b["unaccounted"] == b["rss"]


def test_breakdown_may_be_negative_when_parts_claim_more_than_is_resident():
    assert acc.rss_breakdown(500, 200, {"chunks.param": 400})["unaccounted"] == -100


def test_breakdown_rejects_negative_inputs():
    with pytest.raises(ValueError, match="rss_breakdown"):
        acc.rss_breakdown(100, -1, {})


def test_proc_readers_see_this_process():
    status = acc.status_bytes()
    assert status["VmHWM"] >= status["VmRSS"] > 0
    assert acc.peak_rss() >= status["VmHWM"]  # a peak never falls
    assert acc.smaps_rollup()["Rss"] > 0
    io = acc.disk_io()
    assert io["read_bytes"] >= 0 and io["write_bytes"] >= 0


def test_engine_parts_are_the_managers_chunk_bytes():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    engine = hetmem.initialize(model, hetmem.Config(device="cpu", device_budget="1MiB", dtype="bf16",
                                                    memory_trace=False))
    try:
        parts = acc.engine_parts(engine)
        chunk_total = sum(v for k, v in parts.items() if k.startswith("chunks."))
        assert chunk_total == engine.manager.bytes_on(Tier.DEVICE) + engine.manager.bytes_on(Tier.HOST)
        expected = sum(c.nbytes for c in engine.manager.chunks if c.kind is ChunkKind.MASTER and c.tier is not None)
        assert parts["chunks.master"] == expected
        assert acc.padding_share(engine.layout) >= 0.0
        assert set(acc.process_parts(acc.smaps_rollup())) == {"files_mapped_since_baseline"}
        heap = acc.malloc_stats()
        assert heap is None or heap["heap"] >= heap["heap_free"] >= 0
    finally:
        engine.close()


def test_engine_parts_count_the_io_regions_unused_bytes_with_nvme(tmp_path):
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(12)])
    engine = hetmem.initialize(model, hetmem.Config(device="cpu", device_budget="1MiB", host_budget="4MiB",
                                                    nvme_dir=str(tmp_path), dtype="bf16", memory_trace=False))
    try:
        parts = acc.engine_parts(engine)
        stats = engine.manager.nvme.pool.stats()
        assert parts["io_pool_unused"] == stats["capacity"] - stats["in_use"] >= 0
    finally:
        engine.close()
