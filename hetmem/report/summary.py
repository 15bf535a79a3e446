"""The report's numbers: one summary object per step, computed from a validated trace.

``summarize(trace, step)`` returns a dict with these keys (stable: new keys may be added,
none renamed or removed within ``SUMMARY_VERSION``).  Bytes are ints, times float seconds,
shares fractions in [0, 1]; a tier is "device", "host" or "nvme"; KIND is a chunk kind.

- ``format``: "hetmem-memory-summary"; ``version``: SUMMARY_VERSION; ``trace_version``.
- ``meta``: the trace's meta, as recorded.
- ``step``: the iteration summarised (its ``step`` number; null when no step was recorded);
  ``warmup``: whether that step was a warm-up step; ``steps_recorded``, ``warmup_steps``.
- ``peaks``: ``{tier: {...}}`` over the moments of the step, where a moment's tier total is
  its chunk bytes plus, on the device, its non-model bytes (on the device the moment's
  measured ``peak_total`` instead, when the trace records it; see ``moment_total``):
  ``peak_bytes``, ``budget_bytes`` (null: no limit), ``budget_used`` (peak / budget or null),
  ``moment`` / ``moment_kind`` / ``module`` (the first moment reaching the peak),
  ``model_bytes`` (chunk bytes at the peak), ``at_peak`` ({KIND: bytes} and, on the device,
  ``non_model``), ``max`` (the largest value each of those reaches at any moment, plus
  ``model``), ``in_use`` (any bytes at any moment, or a budget set).
- ``moved``: the step's transfers: ``directions`` ({"src->dst": {``bytes``, ``moves``,
  ``wait_s``, ``by_kind`` {KIND: bytes}, ``by_cause`` {cause: bytes}}}, in DIRECTIONS order,
  only directions that moved), ``total_bytes``, ``moves``, ``wait_s`` (sum of the moves').
- ``steps``: every recorded step, in order: ``step``, ``warmup``, ``total_s``, ``wait_s``,
  ``moved_bytes`` ({direction: bytes}), ``moved_total_bytes``, ``moves``, ``evictions``,
  ``peak_bytes`` ({tier: peak}).
- ``padding``: chunk capacity not filled by parameters: ``chunks``, ``chunk_bytes``,
  ``used_bytes``, ``padding_bytes`` (= sum of (capacity - used) * element size),
  ``padding_fraction`` (of chunk bytes), and ``by_kind`` {KIND: the same keys}.
- ``top_moments``: up to TOP_MOMENTS moments by non-model bytes, largest first (ties: the
  earlier moment): ``index``, ``kind``, ``module``, ``non_model_bytes``,
  ``chunk_budget_bytes`` (null: none), ``device_model_bytes``, ``device_total_bytes``.
- ``time``: ``total_s``, ``forward_s``, ``backward_s``, ``optimizer_s``, ``other_s`` (the
  rest of the step), ``wait_s`` (compute blocked on transfers; it lies inside the phases),
  and ``share``: each of forward/backward/optimizer/other/wait over ``total_s``.
- ``evictions``: ``count`` and ``by_kind`` {KIND: count} for the step.
- ``non_model_by_module``: [{``module``, ``bytes``}] largest first, from the trace's optional
  per-module attribution ([] when absent).
- ``activations``: saved activations moved to host memory and back: ``min_device_budget`` and
  ``min_device_budget_offload`` (the smallest device budget without / with activation offload,
  null when the trace does not say), and ``steps``: per recorded step with the trace's optional
  counts, ``step``, ``warmup``, ``offloads``, ``offloaded_bytes``, ``restores``,
  ``restored_bytes``, ``late_restores``, ``wait_s``.
- ``losses``: the training loop's [{``step``, ``loss``, ``lr``}] per optimizer step, as the trace
  records them (``hetmem train`` does; [] when absent); ``loss``/``lr`` null when unknown.
"""
from __future__ import annotations

import copy
from typing import Any

from hetmem.report.schema import (CHUNK_KINDS, ELEMENT_SIZES, MOVE_CAUSES, NON_MODEL, TIERS,
                                  TRACE_VERSION)

SUMMARY_FORMAT = "hetmem-memory-summary"
SUMMARY_VERSION = 1
TOP_MOMENTS = 5
# every possible transfer direction, in the order tables list them
DIRECTIONS = ("host->device", "device->host", "host->nvme", "nvme->host", "nvme->device", "device->nvme")
TIME_PARTS = ("forward", "backward", "optimizer", "other", "wait")


def select_step(trace: dict, step: int | None = None) -> dict | None:
    """The step entry to summarise: ``step`` by its number, or by default the last steady
    (non-warm-up) step, else the last one; None when the trace has no steps."""
    steps = trace["steps"]
    if step is None:
        steady = [s for s in steps if not s["warmup"]]
        return (steady or steps or [None])[-1]
    for entry in steps:
        if entry["step"] == step:
            return entry
    recorded = ", ".join(str(s["step"]) for s in steps) or "none"
    raise ValueError(f"step={step!r} is not in this trace; recorded steps: {recorded}")


def summarize(trace: dict, step: int | None = None) -> dict[str, Any]:
    """The summary object of one step (see the module docstring for its keys)."""
    entry = select_step(trace, step)
    steps = trace["steps"]
    budgets = trace["meta"]["budgets"]
    return {
        "format": SUMMARY_FORMAT,
        "version": SUMMARY_VERSION,
        "trace_version": TRACE_VERSION,
        "meta": copy.deepcopy(trace["meta"]),
        "step": None if entry is None else entry["step"],
        "warmup": None if entry is None else entry["warmup"],
        "steps_recorded": len(steps),
        "warmup_steps": sum(1 for s in steps if s["warmup"]),
        "peaks": {tier: tier_peak(entry, tier, budgets[tier]) for tier in TIERS},
        "moved": moved(entry),
        "steps": [step_totals(s) for s in steps],
        "padding": padding(trace["chunks"]),
        "top_moments": top_moments(entry),
        "time": time_split(entry),
        "evictions": evictions(entry),
        "activations": activation_summary(trace),
        "non_model_by_module": sorted(
            ({"module": name, "bytes": size} for name, size in trace.get("non_model_by_module", {}).items()),
            key=lambda row: (-row["bytes"], row["module"])),
        "losses": [{"step": e["step"], "loss": e.get("loss"), "lr": e.get("lr")} for e in trace.get("losses", [])],
    }


def activation_summary(trace: dict) -> dict[str, Any]:
    floors = trace.get("activation_offload", {})
    return {"min_device_budget": floors.get("min_device_budget"),
            "min_device_budget_offload": floors.get("min_device_budget_offload"),
            "steps": [{"step": s["step"], "warmup": s["warmup"], **s["activations"]}
                      for s in trace["steps"] if "activations" in s]}


def moment_bytes(moment: dict, tier: str) -> dict[str, int]:
    """{KIND: bytes} of one tier at one moment (all kinds; a missing kind is 0), plus
    ``non_model`` on the device."""
    recorded = moment[tier]
    values = {kind: recorded.get(kind, 0) for kind in CHUNK_KINDS}
    if tier == "device":
        values[NON_MODEL] = recorded[NON_MODEL]
    return values


def moment_total(moment: dict, tier: str, row: dict[str, int]) -> int:
    """A moment's tier total: on the device the measured simultaneous peak (``peak_total``)
    when the trace has it, else chunk bytes plus the interval's non-model peak (an upper bound:
    the two peaks need not coincide)."""
    if tier == "device" and moment.get("peak_total") is not None:
        return int(moment["peak_total"])
    return sum(row.values())


def tier_peak(entry: dict | None, tier: str, budget: int | None) -> dict[str, Any]:
    moments = [] if entry is None else entry["moments"]
    rows = [moment_bytes(m, tier) for m in moments]
    totals = [moment_total(m, tier, row) for m, row in zip(moments, rows)]
    keys = list(CHUNK_KINDS) + ([NON_MODEL] if tier == "device" else [])
    peak = max(totals, default=0)
    first = totals.index(peak) if rows else None
    at_peak = rows[first] if rows else dict.fromkeys(keys, 0)
    maxima = {key: max((row[key] for row in rows), default=0) for key in keys}
    maxima["model"] = max((sum(row[k] for k in CHUNK_KINDS) for row in rows), default=0)
    return {
        "peak_bytes": peak,
        "budget_bytes": budget,
        "budget_used": peak / budget if budget else None,
        "moment": first,
        "moment_kind": None if first is None else moments[first]["kind"],
        "module": None if first is None else moments[first]["module"],
        "model_bytes": sum(at_peak[k] for k in CHUNK_KINDS),
        "at_peak": at_peak,
        "max": maxima,
        "in_use": peak > 0 or budget is not None,
    }


def direction(move: dict) -> str:
    return f"{move['src']}->{move['dst']}"


def moved(entry: dict | None) -> dict[str, Any]:
    found: dict[str, dict[str, Any]] = {}
    for move in [] if entry is None else entry["moves"]:
        row = found.setdefault(direction(move), {
            "bytes": 0, "moves": 0, "wait_s": 0.0,
            "by_kind": dict.fromkeys(CHUNK_KINDS, 0), "by_cause": dict.fromkeys(MOVE_CAUSES, 0)})
        row["bytes"] += move["bytes"]
        row["moves"] += 1
        row["wait_s"] += move["wait_s"]
        row["by_kind"][move["kind"]] += move["bytes"]
        row["by_cause"][move["cause"]] += move["bytes"]
    directions = {name: found[name] for name in DIRECTIONS if name in found}
    return {
        "directions": directions,
        "total_bytes": sum(row["bytes"] for row in directions.values()),
        "moves": sum(row["moves"] for row in directions.values()),
        "wait_s": sum(row["wait_s"] for row in directions.values()),
    }


def step_totals(entry: dict) -> dict[str, Any]:
    moves = moved(entry)
    return {
        "step": entry["step"],
        "warmup": entry["warmup"],
        "total_s": entry["time"]["total_s"],
        "wait_s": entry["time"]["wait_s"],
        "moved_bytes": {name: row["bytes"] for name, row in moves["directions"].items()},
        "moved_total_bytes": moves["total_bytes"],
        "moves": moves["moves"],
        "evictions": len(entry["evictions"]),
        "peak_bytes": {tier: tier_peak(entry, tier, None)["peak_bytes"] for tier in TIERS},
    }


def padding(chunks: list[dict]) -> dict[str, Any]:
    def totals(selected: list[dict]) -> dict[str, Any]:
        chunk_bytes = sum(c["bytes"] for c in selected)
        used = sum(c["used_elements"] * ELEMENT_SIZES[c["dtype"]] for c in selected)
        return {"chunks": len(selected), "chunk_bytes": chunk_bytes, "used_bytes": used,
                "padding_bytes": chunk_bytes - used,
                "padding_fraction": (chunk_bytes - used) / chunk_bytes if chunk_bytes else 0.0}

    result = totals(chunks)
    result["by_kind"] = {kind: totals([c for c in chunks if c["kind"] == kind])
                         for kind in CHUNK_KINDS if any(c["kind"] == kind for c in chunks)}
    return result


def top_moments(entry: dict | None, count: int = TOP_MOMENTS) -> list[dict[str, Any]]:
    moments = [] if entry is None else entry["moments"]
    ranked = sorted(moments, key=lambda m: (-m["device"][NON_MODEL], m["index"]))[:count]
    rows = []
    for moment in ranked:
        device = moment_bytes(moment, "device")
        model = sum(device[k] for k in CHUNK_KINDS)
        rows.append({
            "index": moment["index"], "kind": moment["kind"], "module": moment["module"],
            "non_model_bytes": device[NON_MODEL], "chunk_budget_bytes": moment["chunk_budget"],
            "device_model_bytes": model, "device_total_bytes": model + device[NON_MODEL],
        })
    return rows


def time_split(entry: dict | None) -> dict[str, Any]:
    recorded = {"forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0, "wait_s": 0.0, "total_s": 0.0}
    if entry is not None:
        recorded.update({key: float(entry["time"][key]) for key in recorded})
    total = recorded["total_s"]
    phases = recorded["forward_s"] + recorded["backward_s"] + recorded["optimizer_s"]
    split = {"total_s": total, "forward_s": recorded["forward_s"], "backward_s": recorded["backward_s"],
             "optimizer_s": recorded["optimizer_s"], "other_s": max(total - phases, 0.0),
             "wait_s": recorded["wait_s"]}
    split["share"] = {part: split[f"{part}_s"] / total if total > 0 else 0.0 for part in TIME_PARTS}
    return split


def evictions(entry: dict | None) -> dict[str, Any]:
    found = [] if entry is None else entry["evictions"]
    by_kind = {kind: sum(1 for e in found if e["kind"] == kind) for kind in CHUNK_KINDS}
    return {"count": len(found), "by_kind": {k: n for k, n in by_kind.items() if n}}
