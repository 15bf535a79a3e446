"""The memory timeline of one step as a PNG (matplotlib, an optional dependency).

One panel per tier in use, x the moments of the step, y bytes with binary-unit ticks:
device chunk bytes stacked by kind with the non-model bytes on top, the device budget and
the per-moment chunk budget as lines; then host (and NVMe) chunk bytes with their budgets.
When the trace has the training loop's losses, a panel below draws the loss per step (and
the learning rate).
matplotlib is imported only here and only when a plot is drawn; no pyplot, so no global
backend or figure state is touched.
"""
from __future__ import annotations

import io
import math
from typing import Any

from hetmem.report.schema import CHUNK_KINDS, NON_MODEL, PHASE_OF_MOMENT
from hetmem.report.summary import moment_bytes, select_step, tier_peak
from hetmem.units import format_bytes, parse_size

MISSING_MATPLOTLIB = "save_png needs matplotlib: pip install 'hetmem[report]'"
FIGSIZE = (12, 7)               # inches
DPI = 120
UNIT_NAMES = ("B", "KiB", "MiB", "GiB", "TiB")
OFF_SCALE = 4                   # host/NVMe budgets above 4x the peak are written, not drawn
MODULE_TICKS = 12               # up to this many moments, ticks also name the module
LOSS_HEIGHT = 2.6               # inches added for the loss panel, when the trace has losses
LOSS_COLOR = "#1f3b73"
LR_COLOR = "#999999"

COLORS = {"PARAM": "#4c72b0", "GRAD": "#dd8452", "MASTER": "#55a868", "EXP_AVG": "#8172b3",
          "EXP_AVG_SQ": "#937860", NON_MODEL: "#c44e52"}
LABELS = {NON_MODEL: "non-model (activations, temporaries)"}
PHASE_SHADE = {"forward": "#eef3fb", "backward": "#fbf1e8", "optimizer": "#edf6ee"}
TIER_TITLES = {"device": "device", "host": "host memory", "nvme": "NVMe"}


class MatplotlibMissingError(ImportError):
    """Raised by the PNG renderer when matplotlib is not installed."""


class NothingToPlotError(ValueError):
    """The chosen step has no moments (or the trace no steps) yet."""


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def render_png(trace: dict, step: int | None = None) -> bytes:
    """The PNG bytes of the timeline of ``step`` (default: the last steady step)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MatplotlibMissingError(MISSING_MATPLOTLIB) from error
    entry = select_step(trace, step)
    if entry is None or not entry["moments"]:
        raise NothingToPlotError("the trace has no recorded moments to plot yet; "
                                 "run at least one training step first")
    budgets = trace["meta"]["budgets"]
    tiers = ["device"] + [t for t in ("host", "nvme")
                          if tier_peak(entry, t, budgets[t])["in_use"]]
    losses = [e for e in trace.get("losses", []) if e.get("loss") is not None]
    figure = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] + (LOSS_HEIGHT if losses else 0)), dpi=DPI,
                    layout="constrained")
    memory_figure = figure
    if losses:
        memory_figure, loss_figure = figure.subfigures(
            2, 1, height_ratios=[FIGSIZE[1], LOSS_HEIGHT])
        _draw_losses(loss_figure.subplots(), losses, entry["step"])
    axes = memory_figure.subplots(len(tiers), 1, sharex=True,
                                  gridspec_kw={"height_ratios": [2.2] + [1] * (len(tiers) - 1)})
    axes = list(axes) if len(tiers) > 1 else [axes]
    moments = entry["moments"]
    for ax, tier in zip(axes, tiers):
        _draw_tier(ax, tier, moments, budgets[tier])
    _draw_phases(axes, moments, entry.get("phases", []))
    _annotate_peak(axes[0], moments)
    _moment_ticks(axes[-1], moments)
    axes[-1].set_xlabel(f"moment of step {entry['step']} (pre-forward / pre-backward points of each "
                        f"module, then the optimizer step)")
    model = trace["meta"]["model"]["name"]
    which = f"step {entry['step']}" + (" (warm-up)" if entry["warmup"] else "")
    figure.suptitle(f"hetmem memory timeline: {model}, {which}, {trace['meta']['dtype']} on "
                    f"{trace['meta']['device']}", fontsize=13)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _draw_losses(ax, losses: list[dict], shown_step: int) -> None:
    """The loss per optimizer step (and the learning rate on a second axis when recorded)."""
    steps = [e["step"] for e in losses]
    ax.plot(steps, [e["loss"] for e in losses], color=LOSS_COLOR, linewidth=1.4, label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(color="#dddddd", linewidth=0.6)
    ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)
    handles, labels = ax.get_legend_handles_labels()
    with_lr = [e for e in losses if e.get("lr") is not None]
    if with_lr:
        lr_ax = ax.twinx()
        lr_ax.plot([e["step"] for e in with_lr], [e["lr"] for e in with_lr], color=LR_COLOR, linewidth=1.0,
                   linestyle="--", label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_ylim(bottom=0)
        more_handles, more_labels = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.09, 1.0), fontsize=9, frameon=False,
              title="training", title_fontsize=10, alignment="left")
    ax.set_title(f"loss per step (the memory above is iteration {shown_step}, 0-based)", fontsize=11)


def _draw_tier(ax, tier: str, moments: list[dict], budget: int | None) -> None:
    rows = [moment_bytes(m, tier) for m in moments]
    keys = [k for k in CHUNK_KINDS if any(r[k] for r in rows)]
    if tier == "device":
        keys.append(NON_MODEL)
    x = list(range(len(moments) + 1))                       # moment i spans [i, i + 1)
    series = [[r[k] for r in rows] + [rows[-1][k]] for k in keys]
    if keys:
        ax.stackplot(x, *series, step="post", colors=[COLORS[k] for k in keys],
                     labels=[LABELS.get(k, k) for k in keys], alpha=0.85, linewidth=0.4, edgecolor="white")
    top = max((sum(r[k] for k in keys) for r in rows), default=0)
    label = f"{TIER_TITLES[tier]} budget {format_bytes(budget or 0)}"
    if budget is not None and (tier == "device" or budget <= OFF_SCALE * top):
        ax.axhline(budget, color="black", linestyle="--", linewidth=1.6, label=label)
        top = max(top, budget)
    elif budget is not None:
        # a host budget far above what was used would flatten the data into the axis: name it
        # in the legend only
        ax.plot([], [], color="black", linestyle="--", linewidth=1.6, label=f"{label}\n(far above this scale)")
    if tier == "device" and any(m["chunk_budget"] is not None for m in moments):
        budgets = [math.nan if m["chunk_budget"] is None else m["chunk_budget"] for m in moments]
        ax.step(x, budgets + [budgets[-1]], where="post", color="#333333", linestyle=":", linewidth=1.4,
                label="chunk budget (what chunks may use)")
        top = max([top] + [b for b in budgets if b == b])
    _binary_y_axis(ax, top * 1.15 or 1024)
    ax.set_ylabel(f"{TIER_TITLES[tier]} bytes")
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=9, frameon=False,
              title=TIER_TITLES[tier], title_fontsize=10, alignment="left")


def _moment_ticks(ax, moments: list[dict]) -> None:
    """Moment i spans [i, i + 1): few moments get a tick in the middle naming the module."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(0, len(moments))
    if len(moments) > MODULE_TICKS:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=20))
        return
    ax.set_xticks([m["index"] + 0.5 for m in moments])
    ax.set_xticklabels([f"{m['index']}\n{_short_module(m)}" for m in moments], fontsize=9)


def _short_module(moment: dict) -> str:
    name = moment["module"] or "optimizer"
    return name if len(name) <= 18 else "..." + name[-15:]


def _binary_y_axis(ax, top: float) -> None:
    """Ticks at power-of-two multiples of one binary unit, labelled in that unit."""
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    power = min(max(int(math.log(top, 1024)), 0), len(UNIT_NAMES) - 1)
    name = UNIT_NAMES[power]
    unit = parse_size(f"1{name}")
    step = 2.0 ** math.ceil(math.log2(top / unit / 6))
    ax.set_ylim(0, top)
    ax.yaxis.set_major_locator(MultipleLocator(step * unit))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: _tick_label(value, unit, name)))


def _tick_label(value: float, unit: int, name: str) -> str:
    return "0" if value == 0 else f"{value / unit:g} {name}"


def _phase_of(moment: dict[str, Any], phases: list[dict[str, Any]]) -> str:
    """The recorded phase whose time span holds the moment (a pre-forward moment of activation
    checkpointing's recomputation belongs to backward); by its kind when no phase holds it."""
    for phase in phases:
        if phase["t_start"] <= moment["t"] <= phase["t_end"] and phase["name"] in PHASE_SHADE:
            return phase["name"]
    return PHASE_OF_MOMENT[moment["kind"]]


def phase_spans(moments: list[dict[str, Any]], phases: list[dict[str, Any]] = ()) -> list[tuple[str, int, int]]:
    """(phase, first moment, one past the last) for each run of moments in one phase."""
    spans: list[tuple[str, int, int]] = []
    for m in moments:
        phase = _phase_of(m, phases)
        if spans and spans[-1][0] == phase:
            spans[-1] = (phase, spans[-1][1], m["index"] + 1)
        else:
            spans.append((phase, m["index"], m["index"] + 1))
    return spans


def _draw_phases(axes, moments: list[dict], phases: list[dict]) -> None:
    for phase, start, end in phase_spans(moments, phases):
        for ax in axes:
            ax.axvspan(start, end, color=PHASE_SHADE[phase], zorder=0, linewidth=0)
            if start > 0:
                ax.axvline(start, color="#888888", linewidth=0.8, zorder=1)
        axes[0].text((start + end) / 2, 1.01, phase, transform=axes[0].get_xaxis_transform(),
                     ha="center", va="bottom", fontsize=10, color="#444444")


def _annotate_peak(ax, moments: list[dict]) -> None:
    peak = tier_peak({"moments": moments}, "device", None)
    if not peak["peak_bytes"]:
        return
    where = peak["moment"]
    module = moments[where]["module"] or "optimizer"
    ax.annotate(f"peak {format_bytes(peak['peak_bytes'])}\nat {where}: {module}",
                xy=(where + 0.5, peak["peak_bytes"]), xytext=(0, 14), textcoords="offset points",
                ha="center", va="bottom", fontsize=9,
                arrowprops={"arrowstyle": "-|>", "color": "#333333", "linewidth": 0.8},
                bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "#999999"})
