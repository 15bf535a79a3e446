"""The report's tables as data: titles, headers and formatted cells, from a summary.

text.py lays them out for a terminal and html.py as HTML tables, so both show the same
numbers in the same words.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hetmem.report.schema import CHUNK_KINDS, NON_MODEL, TIERS
from hetmem.report.summary import DIRECTIONS
from hetmem.units import format_bytes

MAX_STEP_ROWS = 12              # longer runs show the first and last steps
MODULE_WIDTH = 34               # module names are cut (from the left) to this many characters


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    align: str                  # one letter per column: "l" or "r"
    note: str = ""
    footer: list[list[str]] = field(default_factory=list)   # totals, set apart from the rows


def seconds(value: float) -> str:
    return f"{value:.3f} s" if value >= 1 else f"{value * 1e3:.1f} ms"


def share(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def budget(value: int | None, tier: str) -> str:
    if value is not None:
        return format_bytes(value)
    return "unlimited" if tier != "nvme" else "no limit"


def module_name(name: str | None, kind: str | None = None) -> str:
    if not name:
        return "(optimizer)" if kind == "optimizer" else "-"
    return name if len(name) <= MODULE_WIDTH else "..." + name[-(MODULE_WIDTH - 3):]


def step_label(step: int | None, warmup: bool | None) -> str:
    return "-" if step is None else f"{step} (warm-up)" if warmup else str(step)


def header_lines(summary: dict[str, Any]) -> list[str]:
    """Who/what/where: model, dtype, device, budgets and which step the tables show."""
    meta = summary["meta"]
    model = meta["model"]
    budgets = meta["budgets"]
    nvme = budget(budgets["nvme"], "nvme") if summary["peaks"]["nvme"]["in_use"] else "off"
    if summary["step"] is None:
        which = "no step recorded yet"
    else:
        which = (f"step {step_label(summary['step'], summary['warmup'])} "
                 f"({summary['steps_recorded']} steps recorded, {summary['warmup_steps']} of them warm-up)")
    return [
        f"model {model['name']}: {model['parameters']:,} parameters "
        f"({model['trainable_parameters']:,} trainable), {meta['dtype']} on {meta['device']}",
        f"budgets: device {budget(budgets['device'], 'device')}, host {budget(budgets['host'], 'host')}, "
        f"nvme {nvme}; chunks of up to {meta['chunk_elements']:,} elements",  # the capacity: chunks are trimmed
        f"showing {which}",
        f"trace created {meta['created']} by hetmem {meta['hetmem_version']}, torch {meta['torch_version']}",
    ] + loss_lines(summary.get("losses", []))


def loss_lines(losses: list[dict[str, Any]]) -> list[str]:
    """One line on the loss curve: first and last loss, and the lowest."""
    known = [e for e in losses if e["loss"] is not None]
    if not known:
        return []
    low = min(known, key=lambda e: e["loss"])
    return [f"loss {known[0]['loss']:.4g} at step {known[0]['step']} -> {known[-1]['loss']:.4g} at step "
            f"{known[-1]['step']} (lowest {low['loss']:.4g} at step {low['step']}; {len(losses)} steps recorded)"]


def report_tables(summary: dict[str, Any]) -> list[Table]:
    tables = [peak_table(summary), peak_parts_table(summary), moved_table(summary),
              steps_table(summary), moved_per_step_table(summary), padding_table(summary),
              top_moments_table(summary), time_table(summary)]
    if summary["activations"]["steps"]:
        tables.append(activations_table(summary))
    if summary["non_model_by_module"]:
        tables.append(by_module_table(summary))
    return tables


def activations_table(summary: dict[str, Any]) -> Table:
    found = summary["activations"]
    shown, left_out = _elided(found["steps"])
    rows = [[step_label(s["step"], s["warmup"]), f"{format_bytes(s['offloaded_bytes'])} ({s['offloads']})",
             f"{format_bytes(s['restored_bytes'])} ({s['restores']})", str(s["late_restores"]),
             seconds(s["wait_s"])] for s in shown]
    note = ""
    if found["min_device_budget"] is not None:
        note = (f"smallest device budget: {format_bytes(found['min_device_budget'])} without activation "
                f"offload, {format_bytes(found['min_device_budget_offload'])} with it")
    return Table("Saved activations moved to host memory and back", ["step", "offloaded", "restored",
                                                                     "late", "compute wait"],
                 _with_gap(rows, left_out, 5), "lrrrr", note=note)


def _tiers(summary: dict[str, Any]) -> list[str]:
    return [t for t in TIERS if summary["peaks"][t]["in_use"] or t == "device"]


def _step_title(summary: dict[str, Any]) -> str:
    return f"step {step_label(summary['step'], summary['warmup'])}"


def peak_table(summary: dict[str, Any]) -> Table:
    rows = []
    for tier in _tiers(summary):
        peak = summary["peaks"][tier]
        moment = "-" if peak["moment"] is None else f"{peak['moment']} {peak['moment_kind']}"
        rows.append([tier, format_bytes(peak["peak_bytes"]), budget(peak["budget_bytes"], tier),
                     share(peak["budget_used"]), moment, module_name(peak["module"], peak["moment_kind"])])
    return Table(f"Peak memory per tier, {_step_title(summary)}",
                 ["tier", "peak", "budget", "of budget", "moment", "module"], rows, "lrrrll",
                 note="device: chunk bytes + non-model bytes (activations, temporaries) at a moment")


def _kinds_shown(summary: dict[str, Any]) -> list[str]:
    in_chunks = set(summary["padding"]["by_kind"])
    return [k for k in CHUNK_KINDS
            if k in in_chunks or any(summary["peaks"][t]["max"][k] for t in TIERS)]


def peak_parts_table(summary: dict[str, Any]) -> Table:
    kinds = _kinds_shown(summary)
    rows = []
    for tier in _tiers(summary):
        peak = summary["peaks"][tier]
        for label, values in (("at peak", peak["at_peak"]), ("max", peak["max"])):
            cells = [format_bytes(values[k]) for k in kinds]
            cells.append(format_bytes(values[NON_MODEL]) if tier == "device" else "-")
            rows.append([f"{tier} {label}", *cells])
    return Table("Model data by chunk kind and non-model memory",
                 ["tier", *kinds, "non-model"], rows, "l" + "r" * (len(kinds) + 1),
                 note="max: the largest value of each column at any moment of the step")


def _causes(by_cause: dict[str, int]) -> str:
    ranked = sorted(((n, c) for c, n in by_cause.items() if n), reverse=True)
    return ", ".join(f"{cause} {format_bytes(n)}" for n, cause in ranked)


def moved_table(summary: dict[str, Any]) -> Table:
    moved = summary["moved"]
    rows = [[name, str(row["moves"]), format_bytes(row["bytes"]), seconds(row["wait_s"]), _causes(row["by_cause"])]
            for name, row in moved["directions"].items()]
    footer = [["total", str(moved["moves"]), format_bytes(moved["total_bytes"]), seconds(moved["wait_s"]), ""]]
    return Table(f"Bytes moved, {_step_title(summary)}",
                 ["direction", "moves", "bytes", "compute waited", "by cause"], rows, "lrrrl",
                 note="compute waited: time the step was blocked on these transfers (0: fully hidden)",
                 footer=footer)


def _elided(steps: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The steps to list (the first 3 and the last ones) and how many were left out."""
    if len(steps) <= MAX_STEP_ROWS:
        return steps, 0
    head, tail = 3, MAX_STEP_ROWS - 4
    return steps[:head] + steps[-tail:], len(steps) - head - tail


def _with_gap(rows: list[list[str]], left_out: int, width: int) -> list[list[str]]:
    if left_out:
        rows.insert(3, [f"... {left_out} more steps (see to_json())"] + [""] * (width - 1))
    return rows


def is_gap_row(row: list[str]) -> bool:
    """A row that stands for rows left out: text in its first cell only, run across the table."""
    return row[0].startswith("... ") and not any(row[1:])


def steps_table(summary: dict[str, Any]) -> Table:
    shown, left_out = _elided(summary["steps"])
    rows = [[step_label(s["step"], s["warmup"]), seconds(s["total_s"]), seconds(s["wait_s"]),
             share(s["wait_s"] / s["total_s"] if s["total_s"] else None), format_bytes(s["moved_total_bytes"]),
             str(s["evictions"]), format_bytes(s["peak_bytes"]["device"])]
            for s in shown]
    return Table("Every recorded step", ["step", "time", "waited", "waited %", "moved", "evictions",
                                          "device peak"], _with_gap(rows, left_out, 7), "lrrrrrr")


def moved_per_step_table(summary: dict[str, Any]) -> Table:
    used = [d for d in DIRECTIONS if any(d in s["moved_bytes"] for s in summary["steps"])]
    shown, left_out = _elided(summary["steps"])
    rows = [[step_label(s["step"], s["warmup"]), *(format_bytes(s["moved_bytes"].get(d, 0)) for d in used),
             format_bytes(s["moved_total_bytes"])] for s in shown]
    return Table("Bytes moved per step and direction", ["step", *used, "total"],
                 _with_gap(rows, left_out, len(used) + 2), "l" + "r" * (len(used) + 1))


def padding_table(summary: dict[str, Any]) -> Table:
    pad = summary["padding"]

    def cells(label: str, row: dict[str, Any]) -> list[str]:
        return [label, str(row["chunks"]), format_bytes(row["chunk_bytes"]), format_bytes(row["used_bytes"]),
                format_bytes(row["padding_bytes"]), share(row["padding_fraction"])]

    return Table("Chunk padding (capacity not filled by parameters)",
                 ["kind", "chunks", "chunk bytes", "used", "padding", "of chunk bytes"],
                 [cells(kind, row) for kind, row in pad["by_kind"].items()], "lrrrrr",
                 footer=[cells("total", pad)])


def top_moments_table(summary: dict[str, Any]) -> Table:
    rows = [[str(m["index"]), m["kind"], module_name(m["module"], m["kind"]), format_bytes(m["non_model_bytes"]),
             "-" if m["chunk_budget_bytes"] is None else format_bytes(m["chunk_budget_bytes"]),
             format_bytes(m["device_total_bytes"])]
            for m in summary["top_moments"]]
    return Table(f"Top {len(rows)} moments by non-model memory, {_step_title(summary)}",
                 ["#", "moment", "module", "non-model", "chunk budget", "device total"], rows, "rllrrr",
                 note="chunk budget: device bytes the chunks may use from this moment to the next")


def time_table(summary: dict[str, Any]) -> Table:
    time = summary["time"]
    rows = [[part, seconds(time[f"{part}_s"]), share(time["share"][part])]
            for part in ("forward", "backward", "optimizer", "other")]
    rows.append(["waiting on transfers", seconds(time["wait_s"]), share(time["share"]["wait"])])
    return Table(f"Time, {_step_title(summary)}", ["part", "time", "of step"], rows, "lrr",
                 note="waiting on transfers lies inside the phases above",
                 footer=[["step", seconds(time["total_s"]), share(1.0 if time["total_s"] else None)]])


def by_module_table(summary: dict[str, Any]) -> Table:
    rows = [[module_name(r["module"]), format_bytes(r["bytes"])] for r in summary["non_model_by_module"][:10]]
    return Table("Peak non-model memory by module (profiled)", ["module", "non-model"], rows, "lr")
