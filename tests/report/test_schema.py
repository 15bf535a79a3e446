"""validate_trace: accepts the format, and names the bad path and what it expected."""
from __future__ import annotations

import math

import pytest

from hetmem.report.schema import TRACE_VERSION, TraceVersionError, validate_trace

from .synthetic import synthetic_trace


def test_accepts_the_synthetic_trace():
    validate_trace(synthetic_trace())
    assert TRACE_VERSION == 1


def test_accepts_what_the_format_allows():
    trace = synthetic_trace()
    trace["future_key"] = {"anything": [1, 2]}                  # unknown keys are ignored
    trace["steps"][1]["moments"][0]["future_key"] = 3
    trace["meta"]["budgets"]["host"] = None                       # no limit
    trace["meta"]["budgets"]["nvme"] = None
    trace["steps"][1]["moments"][2]["chunk_budget"] = None
    trace["steps"][1]["moments"][2]["host"] = {}                  # kinds with no bytes may be left out
    del trace["non_model_by_module"]                              # optional
    validate_trace(trace)
    trace["steps"] = []                                           # nothing recorded yet
    validate_trace(trace)


def _set(path: list, value):
    def mutate(trace):
        target = trace
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _delete(path: list):
    def mutate(trace):
        target = trace
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return mutate


def _duplicate_chunk_id(trace):
    trace["chunks"][1]["id"] = 0


BROKEN = [
    (_delete(["format"]), "not a hetmem trace: format: expected 'hetmem-trace', found nothing"),
    (_set(["format"], "chrome-trace"), "not a hetmem trace: format: expected 'hetmem-trace', found 'chrome-trace'"),
    (_set(["version"], "1"), "version: expected an int >= 1"),
    (_set(["version"], 0), "version: expected an int >= 1"),
    (_delete(["meta"]), "meta: missing; expected a JSON object"),
    (_set(["meta", "dtype"], "fp8"), "meta.dtype: expected one of 'fp32', 'bf16', 'fp16', found 'fp8'"),
    (_delete(["meta", "budgets", "host"]), "meta.budgets.host: missing; expected an int (bytes) or null"),
    (_set(["meta", "budgets", "device"], "6GiB"), "meta.budgets.device: expected an int >= 0 (bytes), found '6GiB'"),
    (_set(["meta", "model", "parameters"], -1), "meta.model.parameters: expected an int >= 0, found -1"),
    (_set(["chunks", 1, "used_elements"], 2**20 + 1),
     "chunks[1].used_elements: expected <= capacity_elements=1048576, found 1048577"),
    (_set(["chunks", 2, "bytes"], 123),
     "chunks[2].bytes: expected capacity_elements * element size = 1048576 * 4 (float32) = 4194304, found 123"),
    (_set(["chunks", 0, "kind"], "WEIGHT"), "chunks[0].kind: expected one of 'PARAM'"),
    (_set(["chunks", 0, "params"], ["a", 3]), "chunks[0].params[1]: expected a parameter name (str), found 3"),
    (_duplicate_chunk_id, "chunks[1].id: expected a unique chunk id, found 0 twice"),
    (_set(["steps", 1, "moments", 3, "device", "non_model"], -5),
     "steps[1].moments[3].device.non_model: expected an int >= 0 (bytes), found -5"),
    (_delete(["steps", 1, "moments", 3, "device", "non_model"]),
     "steps[1].moments[3].device.non_model: expected an int >= 0 (bytes), found nothing (missing or null)"),
    (_set(["steps", 0, "moments", 2, "host", "PARAM"], 1.5),
     "steps[0].moments[2].host.PARAM: expected an int >= 0 (bytes), found 1.5"),
    (_set(["steps", 1, "moments", 1, "device", "GRAD"], True),
     "steps[1].moments[1].device.GRAD: expected an int >= 0 (bytes), found True"),
    (_delete(["steps", 1, "moments", 1, "nvme"]), "steps[1].moments[1].nvme: missing; expected a JSON object"),
    (_set(["steps", 1, "moments", 2, "index"], 7),
     "steps[1].moments[2].index: expected 2 (moments count from 0, in order), found 7"),
    (_set(["steps", 1, "moments", 2, "kind"], "post_forward"), "steps[1].moments[2].kind: expected one of"),
    (_set(["steps", 0, "moments", 0, "t"], math.nan), "steps[0].moments[0].t: expected a finite number"),
    (_delete(["steps", 1, "moments", 0, "chunk_budget"]),
     "steps[1].moments[0].chunk_budget: missing; expected an int (bytes) or null"),
    (_set(["steps", 1, "step"], 0), "steps[1].step: expected a unique iteration index, found 0 twice"),
    (_set(["steps", 1, "warmup"], "no"), "steps[1].warmup: expected true or false, found a string ('no')"),
    (_set(["steps", 1, "t_end"], 0.5), "steps[1].t_end: expected >= t_start=1.0, found 0.5"),
    (_set(["steps", 0, "phases", 0, "name"], "sideways"), "steps[0].phases[0].name: expected one of 'forward'"),
    (_set(["steps", 1, "moves", 4, "chunk"], 99), "steps[1].moves[4].chunk: expected the id of a chunk in the "
                                                  "chunks table, found 99"),
    (_set(["steps", 1, "moves", 4, "kind"], "MASTER"),
     "steps[1].moves[4].kind: expected 'PARAM' (the kind of chunk 0), found 'MASTER'"),
    (_set(["steps", 1, "moves", 0, "dst"], "host"), "steps[1].moves[0].dst: expected a tier other than src='host'"),
    (_set(["steps", 1, "moves", 0, "src"], "disk"), "steps[1].moves[0].src: expected one of 'device', 'host', 'nvme'"),
    (_set(["steps", 1, "moves", 0, "t_end"], 0.0), "steps[1].moves[0].t_end: expected >= t_start=1.0, found 0.0"),
    (_set(["steps", 1, "moves", 0, "wait_s"], -0.1), "steps[1].moves[0].wait_s: expected a number of seconds >= 0"),
    (_set(["steps", 1, "moves", 0, "cause"], "teleport"), "steps[1].moves[0].cause: expected one of 'fetch'"),
    (_set(["steps", 1, "evictions", 0, "moment"], 9),
     "steps[1].evictions[0].moment: expected a moment index of this step (0..4), found 9"),
    (_delete(["steps", 1, "evictions", 0, "reason"]), "steps[1].evictions[0].reason: missing; expected a string"),
    (_set(["steps", 1, "time", "wait_s"], -1), "steps[1].time.wait_s: expected a number of seconds >= 0, found -1"),
    (_delete(["steps", 0, "time", "total_s"]),
     "steps[0].time.total_s: expected a finite number (seconds), found nothing"),
    (_set(["steps", 0, "moves"], {}), "steps[0].moves: expected a list, found a JSON object ({})"),
    (_set(["non_model_by_module", "layers.0"], "big"),
     "non_model_by_module['layers.0']: expected an int >= 0 (bytes), found 'big'"),
]


@pytest.mark.parametrize("mutate, message", BROKEN, ids=[m for _, m in BROKEN])
def test_rejects_broken_traces_naming_the_path(mutate, message):
    trace = synthetic_trace()
    mutate(trace)
    with pytest.raises(ValueError) as raised:
        validate_trace(trace)
    assert str(raised.value).startswith(message), str(raised.value)


def test_rejects_what_is_not_an_object():
    with pytest.raises(ValueError, match=r"^trace: expected a JSON object, found a list"):
        validate_trace([1, 2])
    trace = synthetic_trace()
    trace["steps"][1]["moments"][3] = "pre_forward"
    with pytest.raises(ValueError, match=r"^steps\[1\]\.moments\[3\]: expected a JSON object, found a string"):
        validate_trace(trace)


def test_a_newer_version_names_the_version_and_the_fix():
    trace = synthetic_trace()
    trace["version"] = 2
    with pytest.raises(TraceVersionError) as raised:
        validate_trace(trace)
    message = str(raised.value)
    assert "format version 2" in message and "version 1" in message
    assert "pip install -U hetmem" in message
    assert isinstance(raised.value, ValueError)
