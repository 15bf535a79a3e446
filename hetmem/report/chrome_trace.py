"""The whole run as Chrome / Perfetto trace-event JSON (open it in ui.perfetto.dev).

One process (the run) with these tracks:
- "steps" and "phases": a slice per step and per forward/backward/optimizer phase;
- "moments": an instant per tracer moment, with the bytes recorded there;
- "evictions": an instant per eviction decision, with its reason;
- "compute waits": a slice where compute was blocked on a transfer, drawn at the end of
  the transfer it waited for (the trace records how long, not when);
- one track per transfer direction ("moves host->device", ...), with more lanes
  ("moves host->device (lane 2)") where transfers overlap in time: Perfetto nests slices on a track and
  cannot show two that overlap partially;
- counters "device bytes", "host bytes", "nvme bytes" (one series per chunk kind, plus
  non-model on the device) and "chunk budget".

Times are microseconds (``ts``, ``dur``) from the engine's creation.
"""
from __future__ import annotations

from typing import Any

from hetmem.report.schema import NON_MODEL, TIERS
from hetmem.report.summary import DIRECTIONS, direction, moment_bytes
from hetmem.units import format_bytes

PID = 1
MOMENTS_TID, EVICTIONS_TID = 1, 2           # instant tracks; slice tracks get tids from _Lanes
FIRST_LANE_TID = 10
# slice groups in the order their tracks are listed; a move group is "moves <direction>"
GROUP_ORDER = ["steps", "phases", "compute waits", *(f"moves {d}" for d in DIRECTIONS)]


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def _us(ns: int) -> float:
    return ns / 1000


class _Lanes:
    """Tracks for slices that may overlap: each slice goes on the first lane of its group
    that is free at its start, so the slices of one lane never overlap."""

    def __init__(self) -> None:
        self.next_tid = FIRST_LANE_TID
        self.lanes: dict[str, list[list[int]]] = {}       # group -> [[tid, busy until (ns)], ...]
        self.tracks: dict[int, tuple[str, int]] = {}      # tid -> (group, lane number from 1)

    def place(self, group: str, start_ns: int, end_ns: int) -> int:
        lanes = self.lanes.setdefault(group, [])
        for lane in lanes:
            if lane[1] <= start_ns:
                lane[1] = end_ns
                return lane[0]
        tid, self.next_tid = self.next_tid, self.next_tid + 1
        lanes.append([tid, end_ns])
        self.tracks[tid] = (group, len(lanes))
        return tid

    def metadata(self) -> list[dict[str, Any]]:
        ranked = sorted(self.tracks.items(), key=lambda item: (GROUP_ORDER.index(item[1][0]), item[1][1]))
        events = []
        for sort_index, (tid, (group, lane)) in enumerate(ranked, start=2):
            name = group if lane == 1 else f"{group} (lane {lane})"
            events.append(_metadata("thread_name", tid, {"name": name}))
            events.append(_metadata("thread_sort_index", tid, {"sort_index": sort_index}))
        return events


def _slice(name: str, start_ns: int, end_ns: int, cat: str, args: dict[str, Any]) -> dict[str, Any]:
    """A complete event without its track; build_chrome_trace places it on a lane."""
    return {"name": name, "cat": cat, "ph": "X", "pid": PID, "tid": None,
            "ts": _us(start_ns), "dur": _us(end_ns - start_ns), "args": args}


def _instant(name: str, tid: int, t: float, cat: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "cat": cat, "ph": "i", "s": "t", "pid": PID, "tid": tid, "ts": _us(_ns(t)),
            "args": args}


def _counter(name: str, t: float, values: dict[str, int]) -> dict[str, Any]:
    return {"name": name, "cat": "memory", "ph": "C", "pid": PID, "tid": 0, "ts": _us(_ns(t)),
            "args": values}


def _metadata(name: str, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": PID, "tid": tid, "ts": 0, "args": args}


def build_chrome_trace(trace: dict[str, Any]) -> dict[str, Any]:
    """The trace-event JSON object for every recorded step of ``trace``."""
    slices: list[tuple[str, int, int, dict[str, Any]]] = []      # (group, start ns, end ns, event)
    instants: list[dict[str, Any]] = []
    for step in trace["steps"]:
        label = f"step {step['step']}" + (" (warm-up)" if step["warmup"] else "")
        start, end = _ns(step["t_start"]), _ns(step["t_end"])
        slices.append(("steps", start, end, _slice(label, start, end, "step",
                                                   {"step": step["step"], "warmup": step["warmup"], **step["time"]})))
        for phase in step["phases"]:
            start, end = _ns(phase["t_start"]), _ns(phase["t_end"])
            slices.append(("phases", start, end, _slice(phase["name"], start, end, "phase", {"step": step["step"]})))
        for moment in step["moments"]:
            instants += _moment_events(step["step"], moment)
        for eviction in step["evictions"]:
            instants.append(_instant(f"evict {eviction['kind']} #{eviction['chunk']}", EVICTIONS_TID,
                                     eviction["t"], "eviction",
                                     {k: eviction[k] for k in ("chunk", "kind", "src", "dst", "moment", "reason")}))
        for move in step["moves"]:
            slices += _move_slices(move)
    lanes = _Lanes()
    for group, start, end, event in sorted(slices, key=lambda s: (s[1], -s[2])):
        event["tid"] = lanes.place(group, start, end)
    meta = trace["meta"]
    header = [_metadata("process_name", 0, {"name": f"hetmem run: {meta['model']['name']}"}),
              _metadata("thread_name", MOMENTS_TID, {"name": "moments"}),
              _metadata("thread_sort_index", MOMENTS_TID, {"sort_index": 0}),
              _metadata("thread_name", EVICTIONS_TID, {"name": "evictions"}),
              _metadata("thread_sort_index", EVICTIONS_TID, {"sort_index": 1}),
              *lanes.metadata()]
    events = sorted([event for *_, event in slices] + instants, key=lambda e: e["ts"])
    return {"traceEvents": header + events, "displayTimeUnit": "ms",
            "otherData": {"source": "hetmem", "trace_format": trace["format"],
                          "trace_version": trace["version"], **meta}}


def _moment_events(step: int, moment: dict[str, Any]) -> list[dict[str, Any]]:
    t = moment["t"]
    per_tier = {tier: moment_bytes(moment, tier) for tier in TIERS}
    name = f"{moment['kind']} {moment['module'] or '(optimizer)'}"
    args = {"step": step, "index": moment["index"], "module": moment["module"],
            "device_bytes": sum(per_tier["device"].values()),
            "non_model_bytes": per_tier["device"][NON_MODEL], "chunk_budget": moment["chunk_budget"]}
    events = [_instant(name, MOMENTS_TID, t, "moment", args)]
    for tier in TIERS:
        events.append(_counter(f"{tier} bytes", t, per_tier[tier]))
    if moment["chunk_budget"] is not None:
        events.append(_counter("chunk budget", t, {"chunk_budget": moment["chunk_budget"]}))
    return events


def _move_slices(move: dict[str, Any]) -> list[tuple[str, int, int, dict[str, Any]]]:
    start, end = _ns(move["t_start"]), _ns(move["t_end"])
    name = f"{move['kind']} #{move['chunk']} {direction(move)}"
    args = {"chunk": move["chunk"], "kind": move["kind"], "src": move["src"], "dst": move["dst"],
            "bytes": move["bytes"], "size": format_bytes(move["bytes"]), "wait_s": move["wait_s"],
            "cause": move["cause"]}
    found = [(f"moves {direction(move)}", start, end, _slice(name, start, end, "move", args))]
    if move["wait_s"] > 0:
        wait_start = max(start, end - _ns(move["wait_s"]))
        found.append(("compute waits", wait_start, end,
                      _slice(f"wait for {name}", wait_start, end, "wait",
                             {"wait_s": move["wait_s"], "chunk": move["chunk"], "cause": move["cause"]})))
    return found
