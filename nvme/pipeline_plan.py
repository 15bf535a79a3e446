"""The NVMe optimizer pipeline's shape: its unit, how far it reads ahead, and the host memory it holds.

With optimizer state on NVMe the step walks the chunk groups in order (hetmem/step_pipeline.py):
while group i is updated by the CPU Adam, the next ``depth`` groups are being read from NVMe and
groups already updated are written back (the host budget spills them first).  So the step holds
``depth + 2`` groups in host memory at once: one being written back, one being updated, ``depth``
being read.

**The unit** is one chunk group, sized for the disk when state is on NVMe.  Slicing a group for
IO is not done: the chunk manager keeps whole chunks resident (a chunk's payload is one buffer, its
tier one state), so the unit's size is the chunk size.  With ``chunk_size: "auto"``, ``nvme_dir``
set and a model whose chunks outgrow ``host_budget``, ``nvme_unit_elements`` caps the capacity at
the largest unit that

- fits ``STEP_HOST_SHARE`` of host_budget ``1 + GROUPS_BESIDE_READS`` times (the shallowest
  pipeline; the other share holds the write-backs in flight, whose source buffers count until they
  land, and the next forward's parameters), and
- keeps the pipeline's fill and drain (one unit read before the first update, one written after the
  last) under ``FILL_DRAIN_SHARE`` of the step's disk time: the step reads and writes every unit
  once, so that is a unit of at most ``FILL_DRAIN_SHARE`` of the model's chunk bytes.

Neither needs a measured rate: both are shares of bytes.  The device budget's own cap (a moment
holds several chunks, hetmem/engine.py) still applies; the smallest wins.  An int or a size in
``chunk_size`` overrides all of it.  A parameter larger than the capacity still gets a group of its
own, so the largest parameters bound the unit from below: in the 151.5M GPT of
``benchmarks/nvme_train.py`` each 4.2M-element weight is a group (56 MiB of state after the
warm-up), and capacities from 1M to 2M elements give the same 73 groups.  Going below that needs
sliced IO within a chunk, which the chunk manager's whole-chunk residency does not have.

**The depth**, ``nvme_pipeline_depth``: an int >= 1 (kept as given), or "auto", derived at run
time from what the engine measures (hetmem/nvme/pipeline_tuner.py):

- ``StepRates`` from each applied step (EWMA over steps): the rate the step's transfers reached
  (its bytes moved over its seconds: the transfers ran within the step, so this is a lower bound
  of the disk's rate, exact when the step waits on the disk), the rate of the step's own work
  (bytes of state updated over its seconds not blocked on transfers: the CPU Adam and the rest
  of the main thread's work per group, which is the time between two reads' issues), the bytes
  the step moves per byte updated, and the share of the NVMe bytes that are reads (the swap
  space's counters).
- A unit of ``u`` bytes then reads in ``read_s(u)`` and is updated in ``update_s(u)``.  The read
  of unit i+d is issued when unit i starts, so it has ``d`` updates' time to land (prefetch
  distance): the smallest depth that keeps the reads ahead of the updates is
  ``ceil(read_s / update_s)``.  Deep when the disk is slow relative to the update, 1 when fast.
  With the rates above the ratio is ``read_share * seconds / (seconds - blocked)``: a step that
  never waits on a transfer needs no more than one group ahead; one that waits three quarters of
  its time on transfers that are half reads needs two.
- Capped by the host budget: ``depth + 2`` units within ``STEP_HOST_SHARE`` of host_budget (read
  further ahead, the step displaces chunks it reads again: on the development VM depths 2 and 3
  at 384 MiB moved more bytes and were no faster), and by ``MAX_AUTO_DEPTH``.  Measured with
  ``benchmarks/nvme_pipeline_plan.py`` (README "NVMe step pipeline"): at 768 MiB, where two
  groups ahead fit, the derived depth 2 took 0.84-0.89x depth 1's step time (synchronous step).
  An overlapped step (``overlap_step``) is applied by the next forward, whose parameters and the
  backward's early reads of the step's state (hetmem/step_pipeline.py) hold host memory too: its
  share is ``OVERLAPPED_HOST_SHARE``.  Measured there at 768 MiB (three runs), depth 2 moved 3-9%
  more bytes than depth 1 and was not consistently faster (0.81-1.28x its step time).
- Hysteresis: the depth changes only when the measured ratio leaves the band around it by
  ``REPLAN_MARGIN`` of a group, so noise does not flip it step to step.  Each change is logged at
  INFO with the figures, and the plan's ``reason`` says them.

Not counted: the forward compute between a group's uses when the step is overlapped (the tracer's
moments carry no durations); it is left out of both the transfer time and the update time of an
overlapped step, so its ratio reads high: the depth then errs deep, within the host cap.  Before
the first step is measured, "auto" is ``AUTO_DEPTH``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hetmem._core.units import format_bytes

AUTO = "auto"
AUTO_DEPTH = 1           # what "auto" reads ahead until the first step is measured
GROUPS_BESIDE_READS = 2  # the group being updated and the one being written back
STEP_HOST_SHARE = 0.5    # the pipeline's depth + 2 units fit this share of host_budget ("auto" only)
OVERLAPPED_HOST_SHARE = 0.25  # the same for an overlapped step, which shares host memory with the forward
FILL_DRAIN_SHARE = 0.04  # one unit's read + one unit's write: at most this share of the step's disk time
MAX_AUTO_DEPTH = 8       # "auto" reads at most this many groups ahead
REPLAN_MARGIN = 0.25     # groups the measured need must pass the current depth's band by to change it
# nvme_spill_ahead: after each update, the step starts the stores that this many groups' reads past
# the read-ahead will need room for (hetmem/step_pipeline.py ``_spill_ahead``).  The 151.5M GPT of
# benchmarks/nvme_train.py at a 384 MiB host budget, synchronous step (README "Training with state
# on NVMe"): the disk sat idle 2.7-4.1% of the step against 9.2-11.4% without, and the step reached
# 87-89.6% of its own replay against 74-75%; end to end (benchmarks/nvme_pipeline_plan.py, engines
# stepped in turn) even within the noise at 256, 384 and 768 MiB (0.94-1.03x the step).
SPILL_AHEAD = 2
MAX_SPILL_AHEAD = 8


@dataclass(frozen=True)
class StepRates:
    """What the engine measured of its own NVMe steps (hetmem/nvme/pipeline_tuner.py)."""

    transfer_bytes_per_s: float  # bytes the step moved over its seconds (a lower bound of the disk's rate)
    update_bytes_per_s: float    # bytes of state (all of a group's chunks) updated per second of the step's
                                 # own work: Adam kernels and the rest, time blocked on transfers left out
    moved_per_updated: float     # bytes the step moves per byte of state it updates
    read_share: float            # of the bytes moved to and from NVMe, the share read
    overlapped: bool = False     # measured on overlapped steps (applied by the next forward)

    def __post_init__(self) -> None:
        for name in ("transfer_bytes_per_s", "update_bytes_per_s", "moved_per_updated"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"StepRates.{name}={value!r} must be a finite number > 0")
        if not 0.0 <= self.read_share <= 1.0:
            raise ValueError(f"StepRates.read_share={self.read_share!r} must be in [0, 1]")

    def read_s(self, unit_bytes: int) -> float:
        """Seconds to read one unit of ``unit_bytes`` of state at the measured rate."""
        return unit_bytes * self.moved_per_updated * self.read_share / self.transfer_bytes_per_s

    def update_s(self, unit_bytes: int) -> float:
        """Seconds of the step's own work (not waiting) for one unit: the time between two reads' issues."""
        return unit_bytes / self.update_bytes_per_s

    def describe(self, unit_bytes: int) -> str:
        return (f"transfers {self.transfer_bytes_per_s / 1e9:.2f} GB/s ({self.read_share:.0%} reads), "
                f"updates {self.update_bytes_per_s / 1e9:.2f} GB/s of state; a {format_bytes(unit_bytes)} group "
                f"reads in {_ms(self.read_s(unit_bytes))}, updates in {_ms(self.update_s(unit_bytes))}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


@dataclass(frozen=True)
class PipelinePlan:
    depth: int            # chunk groups read ahead of the one being updated
    group_bytes: int      # the largest chunk group: the pipeline's unit
    reason: str           # how depth was chosen, with the measured figures (logged, reported by benchmarks)
    rates: StepRates | None = None  # the measured figures (None: no step measured yet)

    @property
    def host_groups(self) -> int:
        """Chunk groups the step holds in host memory at once."""
        return self.depth + GROUPS_BESIDE_READS

    @property
    def host_bytes(self) -> int:
        return self.host_groups * self.group_bytes


def check_depth_setting(value) -> None:
    """ValueError naming ``nvme_pipeline_depth`` unless ``value`` is "auto" or an int >= 1."""
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"nvme_pipeline_depth={value!r} is invalid: give 'auto' (derived from the measured disk "
                         f"and Adam rates and the host budget) or the number of chunk groups the optimizer step "
                         f"reads ahead from NVMe (an int >= 1)")


def check_spill_ahead(value) -> None:
    """ValueError naming ``nvme_spill_ahead`` unless ``value`` is an int in [0, MAX_SPILL_AHEAD]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SPILL_AHEAD:
        raise ValueError(f"nvme_spill_ahead={value!r} is invalid: give the number of chunk groups, past the "
                         f"read-ahead, whose room the NVMe optimizer step makes one update early: an int from 0 "
                         f"(room made when a read needs it) to {MAX_SPILL_AHEAD}")


def host_cap(group_bytes: int, host_budget: int, share: float = STEP_HOST_SHARE) -> int:
    """The deepest "auto" depth whose ``depth + 2`` groups fit ``share`` of host_budget (>= 1)."""
    fits = int(host_budget * share) // max(1, group_bytes)
    return max(1, min(MAX_AUTO_DEPTH, fits - GROUPS_BESIDE_READS))


def derive_depth(rates: StepRates, group_bytes: int, host_budget: int, current: int | None = None
                 ) -> tuple[int, str]:
    """(depth, reason): the smallest depth whose reads land before their updates, with hysteresis
    around ``current`` (the depth now), capped by ``host_cap``.  See the module docstring."""
    need_ratio = rates.read_s(group_bytes) / rates.update_s(group_bytes)
    need = max(1, math.ceil(need_ratio))
    if current is not None and need != current:
        # change only when the ratio clears the current depth's band (current - 1, current] by the margin
        if current - 1 - REPLAN_MARGIN <= need_ratio <= current + REPLAN_MARGIN:
            need = current
    share = OVERLAPPED_HOST_SHARE if rates.overlapped else STEP_HOST_SHARE
    cap = host_cap(group_bytes, host_budget, share)
    depth = min(need, cap)
    reason = (f"auto: measured {rates.describe(group_bytes)} -> {need} ahead keep the reads ahead of the updates "
              f"(read/update {need_ratio:.2f})")
    if depth < need:
        reason += (f"; host budget {format_bytes(host_budget)} holds {cap} ahead ({depth + GROUPS_BESIDE_READS} "
                   f"groups in {share:.0%} of it{', the step being overlapped' if rates.overlapped else ''})")
    return depth, reason


def plan_pipeline(group_bytes: int, host_budget: int, setting: int | str = AUTO, *,
                  total_bytes: int | None = None, groups: int | None = None, rates: StepRates | None = None,
                  current: int | None = None) -> PipelinePlan:
    """The plan for groups of up to ``group_bytes`` under ``host_budget``; ValueError naming the
    value and the fix when the host budget cannot hold it.  ``total_bytes``: every group's bytes,
    the most the step can hold (a model of one or two groups needs no room for three); ``groups``:
    how many there are.  ``rates``: the measured figures "auto" derives the depth from (None:
    ``AUTO_DEPTH`` until the first step is measured); ``current``: the depth now (hysteresis)."""
    check_depth_setting(setting)
    if setting != AUTO:
        depth, reason = setting, "nvme_pipeline_depth" + ("" if rates is None else
                                                          f" (measured: {rates.describe(group_bytes)})")
    elif rates is None:
        depth, reason = AUTO_DEPTH, f"auto: {AUTO_DEPTH} ahead until the first step is measured"
    else:
        depth, reason = derive_depth(rates, group_bytes, host_budget, current)
    plan = PipelinePlan(depth, group_bytes, reason, rates)
    held = plan.host_groups if groups is None else min(plan.host_groups, groups)
    need = held * group_bytes if total_bytes is None else min(held * group_bytes, total_bytes)
    if need > host_budget:
        shape = f"one written back, one updated, {depth} read ahead: nvme_pipeline_depth={setting!r}"
        if held < plan.host_groups:  # the model has fewer groups than the pipeline would hold
            shape = f"all {held} of the model's groups; the pipeline holds up to {plan.host_groups}: {shape}"
        raise ValueError(
            f"host_budget={format_bytes(host_budget)} is too small for the NVMe pipeline: it keeps {held} chunk "
            f"group{'s' if held != 1 else ''} of up to {format_bytes(group_bytes)} in host memory ({shape}); raise "
            f"host_budget to at least {format_bytes(need)}, "
            + ("lower nvme_pipeline_depth, " if setting != AUTO and setting > 1 else "") + "or lower chunk_size")
    return plan


def state_bytes_per_element(param_bytes: int, mixed: bool) -> int:
    """Chunk bytes per trainable parameter at start: PARAM, MASTER (mixed precision), the two Adam
    moments and the warm-up's fp32 GRAD (hetmem/materialize.py ``create_chunks``)."""
    return param_bytes + (4 if mixed else 0) + 4 + 4 + 4


def nvme_chunk_cap(numel: int, param_bytes: int, mixed: bool, host_budget: int) -> int | None:
    """``nvme_unit_elements`` for a model of ``numel`` parameters, or None when its chunks fit
    ``host_budget`` (the state stays in host memory: the pipeline does not run)."""
    per_element = state_bytes_per_element(param_bytes, mixed)
    if numel * per_element <= host_budget:
        return None
    return nvme_unit_elements(numel * per_element, per_element, host_budget)


def nvme_unit_elements(state_bytes: int, bytes_per_element: int, host_budget: int) -> int:
    """The largest chunk capacity (elements) for a pipeline unit when state is on NVMe: the
    shallowest pipeline's groups fit ``STEP_HOST_SHARE`` of host_budget and one unit is at most
    ``FILL_DRAIN_SHARE`` of the model's ``state_bytes`` (see the module docstring).  At least
    4096 elements (the chunk alignment); the caller rounds down to it."""
    if bytes_per_element <= 0:
        raise ValueError(f"bytes_per_element={bytes_per_element!r} must be > 0")
    by_host = host_budget * STEP_HOST_SHARE / (AUTO_DEPTH + GROUPS_BESIDE_READS)
    by_fill = state_bytes * FILL_DRAIN_SHARE
    return max(4096, int(min(by_host, by_fill) // bytes_per_element))
