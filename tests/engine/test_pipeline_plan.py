"""The NVMe step pipeline's depth derived from measured rates and the host budget, and its unit
sized for the disk (hetmem/nvme/pipeline_plan.py, hetmem/nvme/pipeline_tuner.py)."""
from __future__ import annotations

import dataclasses
import logging
import math

import pytest

import hetmem
from hetmem.nvme.pipeline_plan import (MAX_AUTO_DEPTH, STEP_HOST_SHARE, PipelinePlan, StepRates, derive_depth,
                                       host_cap, nvme_chunk_cap, nvme_unit_elements, plan_pipeline)
from hetmem.nvme.pipeline_tuner import PipelineTuner
from hetmem.optimizer import StepResult

from .helpers import batches, config, pair, train_engine

MiB = 1 << 20
BIG_HOST = 1 << 40  # a host budget that caps nothing


def rates(read_over_update: float) -> StepRates:
    """Rates whose read/update time ratio per unit is ``read_over_update`` (half the moved bytes read)."""
    # read_s(u) = u * 2 * 0.5 / 1e9 ; update_s(u) = u / update  ->  ratio = update / 1e9
    return StepRates(transfer_bytes_per_s=1e9, update_bytes_per_s=read_over_update * 1e9, moved_per_updated=2.0,
                     read_share=0.5)


def test_rates_give_the_read_and_update_times_of_a_unit():
    r = StepRates(transfer_bytes_per_s=2e9, update_bytes_per_s=4e9, moved_per_updated=2.0, read_share=0.25)
    assert r.read_s(64 * MiB) == 64 * MiB * 2.0 * 0.25 / 2e9
    assert r.update_s(64 * MiB) == 64 * MiB / 4e9


@pytest.mark.parametrize("ratio, depth", [(0.1, 1), (1.0, 1), (1.3, 2), (2.9, 3), (6.2, 7)])
def test_depth_is_the_prefetch_distance_deep_when_the_disk_is_slow(ratio, depth):
    got, reason = derive_depth(rates(ratio), 64 * MiB, BIG_HOST)
    assert got == depth
    assert f"-> {depth} ahead" in reason and f"read/update {ratio:.2f}" in reason and "GB/s" in reason


def test_depth_is_capped_by_the_host_budget_and_says_so():
    host = 6 * 64 * MiB  # half of it holds 3 groups of 64 MiB: one ahead
    assert host_cap(64 * MiB, host) == 1
    depth, reason = derive_depth(rates(5.0), 64 * MiB, host)
    assert depth == 1 and "-> 5 ahead" in reason and "host budget 384.00 MiB holds 1 ahead" in reason
    assert derive_depth(rates(5.0), 64 * MiB, 10 * 64 * MiB)[0] == 3   # 5 groups in half of 640 MiB
    assert derive_depth(rates(50.0), 64 * MiB, BIG_HOST)[0] == MAX_AUTO_DEPTH
    plan = plan_pipeline(64 * MiB, host, "auto", rates=rates(5.0))
    assert plan.depth == 1 and plan.host_bytes <= host * STEP_HOST_SHARE


def test_an_overlapped_step_gets_a_smaller_share_of_the_host_budget():
    host = 20 * 64 * MiB   # half: 10 groups of 64 MiB (8 ahead); a quarter: 5 (3 ahead)
    synchronous, overlapped = rates(5.5), dataclasses.replace(rates(5.5), overlapped=True)
    assert derive_depth(synchronous, 64 * MiB, host)[0] == 6
    depth, reason = derive_depth(overlapped, 64 * MiB, host)
    assert depth == 3 and "holds 3 ahead (5 groups in 25% of it, the step being overlapped)" in reason


def test_depth_changes_only_when_the_ratio_leaves_its_band():
    assert derive_depth(rates(1.2), 1 * MiB, BIG_HOST, current=1)[0] == 1   # within 0.25 of depth 1
    assert derive_depth(rates(1.3), 1 * MiB, BIG_HOST, current=1)[0] == 2
    assert derive_depth(rates(0.8), 1 * MiB, BIG_HOST, current=2)[0] == 2   # within 0.25 below depth 2's band
    assert derive_depth(rates(0.7), 1 * MiB, BIG_HOST, current=2)[0] == 1
    assert derive_depth(rates(4.0), 1 * MiB, BIG_HOST, current=2)[0] == 4


def test_an_int_depth_overrides_the_measurement():
    plan = plan_pipeline(64 * MiB, BIG_HOST, 2, rates=rates(6.0))
    assert plan.depth == 2 and plan.reason.startswith("nvme_pipeline_depth (measured: transfers 1.00 GB/s")
    assert plan_pipeline(64 * MiB, BIG_HOST, 5, rates=rates(0.1)).depth == 5
    assert plan_pipeline(64 * MiB, BIG_HOST, "auto").depth == 1   # nothing measured yet


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "deep", None])
def test_bad_depth_settings_are_named(bad):
    with pytest.raises(ValueError, match=rf"nvme_pipeline_depth={bad!r} is invalid: give 'auto'"):
        plan_pipeline(64 * MiB, BIG_HOST, bad)


@pytest.mark.parametrize("field, value", [("transfer_bytes_per_s", 0.0), ("update_bytes_per_s", math.nan),
                                          ("moved_per_updated", -1.0), ("read_share", 1.5)])
def test_bad_rates_are_named(field, value):
    good = dict(transfer_bytes_per_s=1e9, update_bytes_per_s=1e9, moved_per_updated=2.0, read_share=0.5)
    with pytest.raises(ValueError, match=rf"StepRates.{field}={value!r}"):
        StepRates(**{**good, field: value})


def test_the_host_budget_error_says_how_many_groups_the_model_really_has():
    with pytest.raises(ValueError, match=r"it keeps 2 chunk groups of up to 100 B in host memory \(all 2 of the "
                                         r"model's groups; the pipeline holds up to 3: .*\); raise host_budget to "
                                         r"at least 180 B, or lower chunk_size"):
        plan_pipeline(100, 150, "auto", total_bytes=180, groups=2)
    with pytest.raises(ValueError, match=r"it keeps 3 chunk groups .* \(one written back, one updated, 1 read "
                                         r"ahead: nvme_pipeline_depth='auto'\); raise host_budget to at least 300 B"):
        plan_pipeline(100, 250, "auto", groups=9)


def test_the_unit_is_sized_for_the_host_budget_and_the_fill_and_drain():
    # host: half of 384 MiB holds the shallowest pipeline's 3 groups -> 64 MiB units
    assert nvme_unit_elements(10 << 30, 16, 384 * MiB) == 64 * MiB // 16
    # fill + drain: a unit is at most 4% of the model's 1 GiB of chunk bytes
    assert nvme_unit_elements(1 << 30, 16, BIG_HOST) == int((1 << 30) * 0.04) // 16
    assert nvme_unit_elements(1000, 16, 1000) == 4096   # never below the chunk alignment
    assert nvme_chunk_cap(1000, 4, False, 1 << 30) is None   # fits the host budget: no NVMe pipeline
    assert nvme_chunk_cap(100_000_000, 2, True, 384 * MiB) == 64 * MiB // 18   # bf16: 2 + 4 + 4 + 4 + 4 bytes


class FakeGroup:
    def __init__(self, nbytes: int):
        self.trainable = True
        self.chunks = {"state": type("C", (), {"nbytes": nbytes, "tier": "host"})()}


def test_the_tuner_measures_each_step_once_and_logs_a_change(caplog):
    applied = []
    groups = [FakeGroup(64 * MiB) for _ in range(8)]
    traffic = [0, 0]
    tuner = PipelineTuner(PipelinePlan(1, 64 * MiB, "start"), groups, BIG_HOST, "auto", applied.append,
                          traffic=lambda: tuple(traffic))
    state = 8 * 64 * MiB
    traffic[:] = [state, state]          # every group read and written once
    # 8 s of which 7 blocked on 2x the state moved: reads take 4 s, the work 1 s -> 4 ahead
    slow = StepResult(False, 1.0, 1.0, 8.0, io_wait_s=7.0, compute_s=0.5, io_bytes=2 * state)
    with caplog.at_level(logging.INFO, logger="hetmem.nvme.pipeline_tuner"):
        plan = tuner.observe(slow)
    assert plan.depth == 4 and applied == [plan] and tuner.plan is plan
    assert "NVMe pipeline depth 1 -> 4 after 1 measured step(s)" in caplog.text
    assert tuner.observe(slow) is None and len(applied) == 1   # the same result is measured once
    assert tuner.observe(StepResult(True, math.inf, 1.0, 0.1, reason="inf")) is None   # a skipped step
    traffic[:] = [2 * state, 2 * state]
    fast = StepResult(False, 1.0, 1.0, 1.0, io_wait_s=0.0, compute_s=0.5, io_bytes=2 * state)
    plan = tuner.observe(fast)   # EWMA: the ratio halves to ~2.2, outside depth 4's band
    assert plan.depth == 3 and plan.rates is tuner.rates


def test_the_engine_replans_after_the_warm_up_step(tmp_path, caplog):
    _, model = pair()
    engine = hetmem.initialize(model, config(device_budget="2304KiB", nvme_dir=str(tmp_path / "swap"),
                                             host_budget="900KiB", overlap_step=False, chunk_size="auto"))
    assert engine.nvme_plan.rates is None and engine.nvme_plan.reason.startswith("auto: 1 ahead until")
    # the unit is sized for the disk: below what the device budget alone would allow
    cap = nvme_chunk_cap(engine.layout.numel, 4, False, engine.budgets.host)
    assert engine.layout.chunk_elements <= cap < engine._auto_chunk_elements(engine.budgets.usable)
    with caplog.at_level(logging.INFO, logger="hetmem.nvme.pipeline_tuner"):
        train_engine(engine, batches(1))   # the warm-up step
    plan = engine.nvme_plan
    assert plan.rates is not None and plan.reason.startswith("auto: measured transfers")
    assert engine.adam.pipeline.read_ahead == plan.depth and engine.pipeline_tuner.steps_measured == 1
    # "1 -> N" or "1 confirmed": the first measured plan is logged either way, with its figures
    assert "NVMe pipeline depth 1 " in caplog.text and "auto: measured transfers" in caplog.text
    assert plan.depth == 1   # half of 900 KiB holds fewer than 3 groups of 256 KiB: the host cap keeps 1
    assert engine.last_step.io_bytes > 0   # state really moved to and from NVMe
    train_engine(engine, batches(1, seed=1))
    assert engine.pipeline_tuner.steps_measured == 2 and engine.nvme_plan.rates is not plan.rates
    engine.close()


def test_an_engine_keeps_an_int_depth_and_reports_the_measured_figures(tmp_path):
    _, model = pair()
    engine = hetmem.initialize(model, config(device_budget="2304KiB", nvme_dir=str(tmp_path / "swap"),
                                             host_budget="2MiB", nvme_pipeline_depth=2))
    train_engine(engine, batches(2))
    assert engine.nvme_plan.depth == 2 == engine.adam.pipeline.read_ahead
    assert engine.nvme_plan.reason.startswith("nvme_pipeline_depth (measured: transfers")
    engine.close()
