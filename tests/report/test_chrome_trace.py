"""The Chrome / Perfetto trace: valid trace-event JSON, and the run's moves, phases and memory."""
from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest

from hetmem.report import MemoryReport
from hetmem.report.chrome_trace import build_chrome_trace

from .synthetic import MIB, synthetic_trace

TOLERANCE_US = 1e-6         # float rounding of ns / 1000


def check_trace_event_format(document: dict) -> None:
    """What Perfetto's JSON importer needs from each event (the trace-event format)."""
    assert set(document) >= {"traceEvents", "displayTimeUnit", "otherData"}
    assert document["displayTimeUnit"] == "ms"
    assert isinstance(document["otherData"], dict)
    named_tracks = set()
    for event in document["traceEvents"]:
        assert {"ph", "ts", "pid", "tid", "name"} <= set(event), event
        assert isinstance(event["pid"], int) and isinstance(event["tid"], int), event
        assert isinstance(event["ts"], (int, float)) and event["ts"] >= 0, event
        assert event["ph"] in {"M", "X", "i", "C"}, event
        if event["ph"] == "M":
            assert event["name"] in {"process_name", "thread_name", "thread_sort_index"}, event
            assert event["ts"] == 0 and isinstance(event["args"], dict)
            if event["name"] == "thread_name":
                named_tracks.add((event["pid"], event["tid"]))
        elif event["ph"] == "X":
            assert isinstance(event["dur"], (int, float)) and event["dur"] >= 0, event
        elif event["ph"] == "C":
            assert event["args"], event
            for value in event["args"].values():
                assert isinstance(value, (int, float)) and not isinstance(value, bool), event
        elif event["ph"] == "i":
            assert event["s"] in {"g", "p", "t"}, event
    for event in document["traceEvents"]:
        if event["ph"] in {"X", "i"}:
            assert (event["pid"], event["tid"]) in named_tracks, f"track of {event['name']} has no thread_name"


def check_slices_nest(document: dict) -> None:
    """On one track, any two slices are disjoint or one contains the other."""
    tracks = defaultdict(list)
    for event in document["traceEvents"]:
        if event["ph"] == "X":
            tracks[(event["pid"], event["tid"])].append((event["ts"], event["ts"] + event["dur"], event["name"]))
    for slices in tracks.values():
        slices.sort(key=lambda s: (s[0], -s[1]))
        open_ends: list[float] = []
        for start, end, name in slices:
            while open_ends and open_ends[-1] <= start + TOLERANCE_US:
                open_ends.pop()
            assert not open_ends or end <= open_ends[-1] + TOLERANCE_US, f"{name} overlaps partially"
            open_ends.append(end)


@pytest.fixture
def document(tmp_path):
    path = MemoryReport(synthetic_trace()).save_chrome_trace(tmp_path / "trace.chrome.json")
    return json.loads(path.read_text())


def test_is_valid_trace_event_json(document):
    check_trace_event_format(document)
    check_slices_nest(document)
    assert document["otherData"]["model"]["name"] == "two-linear"
    assert document["otherData"]["trace_version"] == 1


def test_moves_are_slices_in_microseconds(document):
    trace = synthetic_trace()
    moves = [e for e in document["traceEvents"] if e.get("cat") == "move"]
    assert len(moves) == 24
    recorded = sorted((m["chunk"], m["src"], m["dst"], round(m["t_start"] * 1e6), round(m["t_end"] * 1e6))
                      for s in trace["steps"] for m in s["moves"])
    shown = sorted((e["args"]["chunk"], e["args"]["src"], e["args"]["dst"], round(e["ts"]), round(e["ts"] + e["dur"]))
                   for e in moves)
    assert shown == recorded
    read = next(e for e in moves if e["args"]["chunk"] == 3 and e["args"]["src"] == "nvme" and e["ts"] > 1e6)
    assert read["ts"] == pytest.approx(1_500_000) and read["dur"] == pytest.approx(60_000)
    assert read["args"]["bytes"] == 4 * MIB and read["args"]["cause"] == "optimizer"
    assert read["args"]["wait_s"] == 0.002 and read["name"] == "MASTER #3 nvme->host"
    total = defaultdict(int)
    for event in moves:
        total[event["args"]["src"] + "->" + event["args"]["dst"]] += event["args"]["bytes"]
    assert total == {"host->device": 12 * MIB, "device->host": 12 * MIB,
                     "host->nvme": 24 * MIB, "nvme->host": 24 * MIB}


def test_overlapping_moves_get_lanes_of_their_direction(document):
    names = {e["tid"]: e["args"]["name"] for e in document["traceEvents"] if e["name"] == "thread_name"}
    reads = [e for e in document["traceEvents"] if e.get("cat") == "move" and e["args"]["src"] == "nvme"
             and e["ts"] > 1e6]
    assert sorted(names[e["tid"]] for e in reads) == ["moves nvme->host", "moves nvme->host (lane 2)",
                                                     "moves nvme->host (lane 3)"]
    fetches = [e for e in document["traceEvents"] if e.get("cat") == "move" and e["args"]["dst"] == "device"]
    assert {names[e["tid"]] for e in fetches} == {"moves host->device"}      # never overlap: one lane


def test_phases_steps_evictions_and_waits(document):
    events = document["traceEvents"]
    phases = [(e["name"], e["ts"], e["dur"]) for e in events if e.get("cat") == "phase"]
    assert [p[0] for p in phases] == ["forward", "backward", "optimizer"] * 2
    assert phases[3][1] == pytest.approx(1_000_000) and phases[3][2] == pytest.approx(200_000)
    steps = [e["name"] for e in events if e.get("cat") == "step"]
    assert steps == ["step 0 (warm-up)", "step 1"]
    evictions = [e for e in events if e.get("cat") == "eviction"]
    assert len(evictions) == 6 and all(e["ph"] == "i" and e["s"] == "t" for e in evictions)
    assert evictions[0]["args"]["reason"].startswith("belady")
    waits = [e for e in events if e.get("cat") == "wait"]
    assert len(waits) == 6                                             # 3 waiting moves per step
    step1_fetch = next(e for e in waits if e["ts"] >= 1e6 and "host->device" in e["name"])
    assert step1_fetch["ts"] == pytest.approx(1_001_000) and step1_fetch["dur"] == pytest.approx(3_000)


def test_memory_counters_per_tier_and_kind(document):
    counters = [e for e in document["traceEvents"] if e["ph"] == "C"]
    device = [e for e in counters if e["name"] == "device bytes"]
    assert len(device) == 10                                           # one per moment
    at_peak = next(e for e in device if e["ts"] == pytest.approx(1_200_000))
    assert at_peak["args"] == {"PARAM": 4 * MIB, "MASTER": 0, "EXP_AVG": 0, "EXP_AVG_SQ": 0,
                               "GRAD": 2 * MIB, "non_model": 20 * MIB}
    host = [e for e in counters if e["name"] == "host bytes"]
    assert sum(host[-1]["args"].values()) == 30 * MIB
    assert len([e for e in counters if e["name"] == "chunk budget"]) == 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_overlapping_moves_never_overlap_partially_on_a_track(seed):
    rng = random.Random(seed)
    trace = synthetic_trace()
    step = trace["steps"][1]
    template = step["moves"][6]
    step["moves"] = []
    for _ in range(200):
        start = 1.0 + rng.random() * 0.7
        move = dict(template, t_start=start, t_end=start + rng.random() * 0.1,
                    wait_s=rng.choice([0.0, rng.random() * 0.02]))
        move["src"], move["dst"] = rng.choice([("nvme", "host"), ("host", "nvme"), ("host", "device")])
        step["moves"].append(move)
    document = build_chrome_trace(trace)
    check_trace_event_format(document)
    check_slices_nest(document)
    assert len([e for e in document["traceEvents"] if e.get("cat") == "move"]) == 200 + 12


def test_the_nesting_check_catches_partial_overlap():
    def x(ts, dur):
        return {"ph": "X", "pid": 1, "tid": 5, "ts": ts, "dur": dur, "name": f"{ts}+{dur}"}

    check_slices_nest({"traceEvents": [x(0, 10), x(2, 3), x(5, 5), x(10, 1)]})      # nested or disjoint
    with pytest.raises(AssertionError, match="overlaps partially"):
        check_slices_nest({"traceEvents": [x(0, 10), x(5, 10)]})
