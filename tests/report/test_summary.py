"""The report's numbers equal the values worked out by hand from synthetic.py's docstring."""
from __future__ import annotations

import json

import pytest

from hetmem.report import MemoryReport
from hetmem.report.summary import SUMMARY_FORMAT, SUMMARY_VERSION

from .synthetic import MIB, synthetic_trace

KINDS = ("PARAM", "MASTER", "EXP_AVG", "EXP_AVG_SQ", "GRAD")


def _kinds(**mib):
    return {kind: mib.get(kind, 0) * MIB for kind in KINDS}


@pytest.fixture
def summary():
    return MemoryReport(synthetic_trace()).summary()


def test_default_step_is_the_last_steady_one(summary):
    assert (summary["format"], summary["version"]) == (SUMMARY_FORMAT, SUMMARY_VERSION)
    assert summary["step"] == 1 and summary["warmup"] is False
    assert (summary["steps_recorded"], summary["warmup_steps"]) == (2, 1)
    trace = synthetic_trace()
    for step in trace["steps"]:
        step["warmup"] = True
    assert MemoryReport(trace).summary()["step"] == 1          # all warm-up: the last one
    trace["steps"][1]["warmup"] = False
    trace["steps"][0]["warmup"] = False
    trace["steps"].reverse()                                   # order of the list, not the number
    assert MemoryReport(trace).summary()["step"] == 0
    assert MemoryReport(synthetic_trace()).summary(step=0)["warmup"] is True
    with pytest.raises(ValueError, match=r"step=5 is not in this trace; recorded steps: 0, 1"):
        MemoryReport(synthetic_trace()).summary(step=5)


def test_device_peak_split_by_kind_and_non_model(summary):
    device = summary["peaks"]["device"]
    assert device["peak_bytes"] == (4 + 2 + 20) * MIB          # PARAM + GRAD + non-model at moment 2
    assert (device["moment"], device["moment_kind"], device["module"]) == (2, "pre_backward", "layers.1")
    assert device["at_peak"] == {**_kinds(PARAM=4, GRAD=2), "non_model": 20 * MIB}
    assert device["model_bytes"] == 6 * MIB
    assert device["max"] == {**_kinds(PARAM=4, GRAD=2), "non_model": 20 * MIB, "model": 6 * MIB}
    assert device["budget_bytes"] == 64 * MIB
    assert device["budget_used"] == 26 / 64
    warmup = MemoryReport(synthetic_trace()).summary(step=0)["peaks"]["device"]
    assert warmup["peak_bytes"] == (4 + 2 + 22) * MIB and warmup["moment"] == 2


def test_host_and_nvme_peaks(summary):
    host = summary["peaks"]["host"]
    assert host["peak_bytes"] == (4 + 2 + 8 + 8 + 8) * MIB
    assert (host["moment"], host["module"]) == (4, "")
    assert host["at_peak"] == _kinds(PARAM=4, GRAD=2, MASTER=8, EXP_AVG=8, EXP_AVG_SQ=8)
    assert "non_model" not in host["at_peak"]
    assert host["budget_used"] == 30 / 256
    nvme = summary["peaks"]["nvme"]
    assert nvme["peak_bytes"] == 12 * MIB and nvme["moment"] == 0     # first of the tied moments 0..3
    assert nvme["at_peak"] == _kinds(MASTER=4, EXP_AVG=4, EXP_AVG_SQ=4)
    assert nvme["in_use"] is True


def test_a_tier_never_used_without_budget_is_not_in_use():
    trace = synthetic_trace()
    trace["meta"]["budgets"]["nvme"] = None
    for step in trace["steps"]:
        for moment in step["moments"]:
            moment["nvme"] = {}
    nvme = MemoryReport(trace).summary()["peaks"]["nvme"]
    assert (nvme["peak_bytes"], nvme["in_use"], nvme["budget_used"]) == (0, False, None)


def test_bytes_moved_per_direction(summary):
    moved = summary["moved"]
    assert list(moved["directions"]) == ["host->device", "device->host", "host->nvme", "nvme->host"]
    expected = {"host->device": (6, 3, 0.003), "device->host": (6, 3, 0.001),
                "host->nvme": (12, 3, 0.0), "nvme->host": (12, 3, 0.002)}
    for name, (mib, count, wait) in expected.items():
        row = moved["directions"][name]
        assert (row["bytes"], row["moves"]) == (mib * MIB, count)
        assert row["wait_s"] == pytest.approx(wait)
    assert moved["directions"]["host->device"]["by_cause"]["prefetch"] == 4 * MIB
    assert moved["directions"]["host->device"]["by_cause"]["fetch"] == 2 * MIB
    assert moved["directions"]["host->device"]["by_kind"] == _kinds(PARAM=4, GRAD=2)
    assert (moved["total_bytes"], moved["moves"]) == (36 * MIB, 12)
    assert moved["wait_s"] == pytest.approx(0.006)


def test_bytes_moved_equal_the_sum_of_the_recorded_moves():
    trace = synthetic_trace()
    trace["steps"][1]["moves"][5]["bytes"] = 12345               # an odd size among the moves
    summary = MemoryReport(trace).summary()
    sums: dict[str, int] = {}
    for move in trace["steps"][1]["moves"]:
        key = move["src"] + "->" + move["dst"]
        sums[key] = sums.get(key, 0) + move["bytes"]
    assert {k: v["bytes"] for k, v in summary["moved"]["directions"].items()} == sums
    assert summary["moved"]["total_bytes"] == sum(sums.values())
    assert summary["steps"][1]["moved_bytes"] == sums


def test_every_step_has_its_totals(summary):
    steps = summary["steps"]
    assert [(s["step"], s["warmup"]) for s in steps] == [(0, True), (1, False)]
    assert [s["peak_bytes"]["device"] for s in steps] == [28 * MIB, 26 * MIB]
    assert [s["peak_bytes"]["host"] for s in steps] == [30 * MIB, 30 * MIB]
    assert [s["moved_total_bytes"] for s in steps] == [36 * MIB, 36 * MIB]
    assert [s["wait_s"] for s in steps] == [0.010, 0.006]
    assert [s["total_s"] for s in steps] == [1.0, 0.8]
    assert [s["evictions"] for s in steps] == [3, 3]


def test_padding_waste(summary):
    pad = summary["padding"]
    pad_elements = (2**20 - 1_000_000) + (2**20 - 700_000)    # one chunk per group and kind
    assert pad["by_kind"]["PARAM"]["padding_bytes"] == pad_elements * 2
    assert pad["by_kind"]["MASTER"]["padding_bytes"] == pad_elements * 4
    assert pad["by_kind"]["GRAD"]["padding_bytes"] == (2**20 - 1_000_000) * 2
    expected = pad_elements * (2 + 4 + 4 + 4) + (2**20 - 1_000_000) * 2
    assert expected == 5_657_280
    assert pad["padding_bytes"] == expected
    assert pad["chunk_bytes"] == 30 * MIB and pad["chunks"] == 9
    assert pad["used_bytes"] == 30 * MIB - expected
    assert pad["padding_fraction"] == expected / (30 * MIB)
    assert list(pad["by_kind"]) == list(KINDS)


def test_top_moments_by_non_model_bytes(summary):
    top = summary["top_moments"]
    assert [m["index"] for m in top] == [2, 3, 1, 0, 4]
    assert [m["module"] for m in top] == ["layers.1", "layers.0", "layers.1", "layers.0", ""]
    assert [m["non_model_bytes"] for m in top] == [v * MIB for v in (20, 12, 9, 3, 1)]
    assert [m["chunk_budget_bytes"] for m in top] == [v * MIB for v in (44, 52, 55, 61, 63)]
    assert [m["device_total_bytes"] for m in top] == [v * MIB for v in (26, 16, 13, 5, 1)]
    assert [m["device_model_bytes"] for m in top] == [v * MIB for v in (6, 4, 4, 2, 0)]


def test_top_moments_ties_keep_moment_order():
    trace = synthetic_trace()
    for moment in trace["steps"][1]["moments"]:
        moment["device"]["non_model"] = 7
    trace["steps"][1]["moments"][3]["device"]["non_model"] = 8
    assert [m["index"] for m in MemoryReport(trace).summary()["top_moments"]] == [3, 0, 1, 2, 4]


def test_time_split(summary):
    time = summary["time"]
    assert (time["forward_s"], time["backward_s"], time["optimizer_s"], time["wait_s"], time["total_s"]) == \
        (0.2, 0.3, 0.25, 0.006, 0.8)
    assert time["other_s"] == pytest.approx(0.05)
    assert time["share"] == pytest.approx({"forward": 0.25, "backward": 0.375, "optimizer": 0.3125,
                                           "other": 0.0625, "wait": 0.0075})


def test_evictions_and_module_attribution(summary):
    assert summary["evictions"] == {"count": 3, "by_kind": {"PARAM": 2, "GRAD": 1}}
    assert summary["non_model_by_module"] == [{"module": "layers.1", "bytes": 22 * MIB},
                                              {"module": "layers.0", "bytes": 13 * MIB}]


def test_no_steps_recorded():
    trace = synthetic_trace()
    trace["steps"] = []
    del trace["non_model_by_module"]
    summary = MemoryReport(trace).summary()
    assert summary["step"] is None and summary["steps"] == [] and summary["top_moments"] == []
    assert summary["peaks"]["device"]["peak_bytes"] == 0 and summary["peaks"]["device"]["moment"] is None
    assert summary["moved"]["total_bytes"] == 0 and summary["time"]["share"]["wait"] == 0.0
    assert summary["padding"]["padding_bytes"] == 5_657_280          # the chunks exist regardless
    assert summary["non_model_by_module"] == []


def test_to_json_is_the_summary():
    report = MemoryReport(synthetic_trace())
    assert json.loads(report.to_json()) == report.summary()
    assert json.loads(report.to_json(step=0)) == report.summary(step=0)


def test_report_keeps_its_own_copy_of_the_trace():
    trace = synthetic_trace()
    report = MemoryReport(trace)
    trace["steps"][1]["moments"][2]["device"]["non_model"] = 60 * MIB
    assert report.summary()["peaks"]["device"]["peak_bytes"] == 26 * MIB
