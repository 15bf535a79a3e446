"""Re-plans the NVMe step pipeline's depth from the engine's own steps (hetmem/nvme/pipeline_plan.py).

After each applied optimizer step (the warm-up step first) the tuner folds the step's figures
(``StepResult``: seconds, seconds blocked on transfers, bytes moved) and the swap space's read/write
counters into an exponentially weighted average, and plans again with the measured ``StepRates``.
The first measured plan is logged at INFO whether it changes the depth or confirms it; later ones
only when the depth changes.  An int ``nvme_pipeline_depth`` is never changed, but the figures are
still measured (the plan's ``rates``), so a benchmark can report them next to the fixed depth.
"""
from __future__ import annotations

import logging
from typing import Callable

from hetmem.nvme.pipeline_plan import AUTO, PipelinePlan, StepRates, plan_pipeline

logger = logging.getLogger("hetmem.nvme.pipeline_tuner")

EWMA_WEIGHT = 0.5     # weight of the newest step in the running figures
MIN_MEASURED_S = 1e-4  # steps with less work than this (nothing updated) are not measured
DEFAULT_READ_SHARE = 0.5  # no NVMe traffic counted: a step reads and writes each unit once


def swap_traffic(tier) -> Callable[[], tuple[int, int]] | None:
    """(bytes read, bytes written) by the NVMe tier's swap space so far, as a callable; None without a tier."""
    if tier is None:
        return None
    stats = tier.swap.stats
    return lambda: (stats["loaded_bytes"], stats["stored_bytes"])


def live_group_bytes(groups: list) -> list[int]:
    """Each chunk group's live bytes (a ``ChunkGroup``: ``.chunks``), leaving out released chunks (warm-up GRAD)."""
    return [sum(c.nbytes for c in g.chunks.values() if c.tier is not None) for g in groups]


class PipelineTuner:
    """Measures each applied step and keeps the pipeline plan (and its read-ahead) current."""

    def __init__(self, plan: PipelinePlan, groups: list, host_budget: int, setting: int | str,
                 apply: Callable[[PipelinePlan], None], traffic: Callable[[], tuple[int, int]] | None = None):
        self.plan = plan                  # the plan in force (the engine's nvme_plan)
        self.groups = groups              # the layout's ChunkGroups (nvme/ sits below chunk_manager/)
        self.host_budget = host_budget
        self.setting = setting            # nvme_pipeline_depth as configured: "auto" or an int
        self.apply = apply                # sets the engine's plan and the step pipeline's read-ahead
        self.traffic = traffic            # (bytes read from NVMe, bytes written) so far; None: not counted
        self.rates: StepRates | None = None  # the running figures (EWMA), None until a step is measured
        self.steps_measured = 0
        self._seen: object | None = None  # the last StepResult folded in (a result is measured once)
        self._traffic_at = traffic() if traffic is not None else (0, 0)

    def observe(self, result) -> PipelinePlan | None:
        """Fold in an applied step's ``StepResult`` and plan again; the new plan, or None when
        the result was seen already or measures nothing (skipped, no Adam time, no bytes moved)."""
        if result is None or result is self._seen:
            return None
        self._seen = result
        traffic = self.traffic() if self.traffic is not None else (0, 0)
        read, written = traffic[0] - self._traffic_at[0], traffic[1] - self._traffic_at[1]
        self._traffic_at = traffic
        working = result.seconds - result.io_wait_s  # the step's own work, waits left out
        if result.skipped or working < MIN_MEASURED_S or result.io_bytes <= 0:
            return None
        sizes = live_group_bytes(self.groups)
        trainable = sum(size for size, g in zip(sizes, self.groups) if g.trainable)
        if trainable <= 0:
            return None
        step = StepRates(result.io_bytes / result.seconds, trainable / working,
                         result.io_bytes / trainable,
                         read / (read + written) if read + written > 0 else DEFAULT_READ_SHARE,
                         overlapped=result.overlapped)
        self.rates = step if self.rates is None else _blend(self.rates, step, EWMA_WEIGHT)
        self.steps_measured += 1
        before = self.plan
        plan = plan_pipeline(max(sizes), self.host_budget, self.setting, total_bytes=sum(sizes),
                             groups=len(sizes), rates=self.rates, current=before.depth)
        if plan.depth != before.depth:
            logger.info("NVMe pipeline depth %d -> %d after %d measured step(s): %s", before.depth, plan.depth,
                        self.steps_measured, plan.reason)
        elif self.steps_measured == 1 and self.setting == AUTO:
            logger.info("NVMe pipeline depth %d confirmed by the first measured step: %s", plan.depth, plan.reason)
        self.plan = plan
        self.apply(plan)
        return plan


def _blend(old: StepRates, new: StepRates, weight: float) -> StepRates:
    """The running figures: seconds per byte averaged (rates through their reciprocals), shares as they are."""
    def mix(a: float, b: float) -> float:
        return (1 - weight) * a + weight * b

    def mix_rate(a: float, b: float) -> float:
        return 1.0 / mix(1.0 / a, 1.0 / b)

    return StepRates(mix_rate(old.transfer_bytes_per_s, new.transfer_bytes_per_s),
                     mix_rate(old.update_bytes_per_s, new.update_bytes_per_s),
                     mix(old.moved_per_updated, new.moved_per_updated), mix(old.read_share, new.read_share),
                     overlapped=new.overlapped)
