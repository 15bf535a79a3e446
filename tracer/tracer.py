"""The memory tracer: clock + store + budget policy, and the warm-up state machine.

The first micro-step is a warm-up: moments are recorded with their working sets and
non-model peaks while chunks are placed by LRU and the budget is checked against what is live
at every moment and every saved tensor.  Later micro-steps follow the recorded schedule; a
moment that differs from it (another code path) or a non-model peak well above the recorded
one (new input shapes) marks the schedule stale, and the next micro-step warms up again.
"""
from __future__ import annotations

import enum
import logging

from .budget import BudgetPolicy
from .clock import Moment, MomentClock, MomentKind
from .store import MomentRecord, ScheduleStore

logger = logging.getLogger("hetmem.tracer")

# A non-model peak this much above the recorded one means the inputs changed.
GROWTH_FACTOR = 1.10
GROWTH_SLACK = 64 << 10


class TracerMode(enum.Enum):
    WARMUP = "warmup"    # recording this micro-step; LRU placement
    STEADY = "steady"    # following the recorded schedule; Belady placement, prefetch
    STALE = "stale"      # the schedule stopped matching mid-step; LRU until the next warm-up


class MemoryTracer:
    def __init__(self, probe, budget: BudgetPolicy):
        self.probe = probe                  # CpuProbe or AllocatorProbe
        self.budget = budget
        self.clock = MomentClock()
        self.store = ScheduleStore()
        self.mode = TracerMode.WARMUP
        self.warmups = 0                    # completed warm-ups (1 + re-warm-ups)
        self.stale_reason: str | None = None  # why the last schedule went stale
        self.last_interval: tuple[int, int] | None = None  # (moment index, non-model peak) last closed
        self._needs_warmup = True

    # -- micro-step boundaries ---------------------------------------------------------

    def begin_microstep(self) -> None:
        self.clock.reset()
        if self._needs_warmup:
            self.mode = TracerMode.WARMUP
            self.store.start_recording()
        else:
            self.mode = TracerMode.STEADY

    def end_microstep(self, chunk_bytes_min: int) -> None:
        self._close_interval(chunk_bytes_min)
        self.clock.current = None
        if self.mode is TracerMode.WARMUP:
            self.store.finish_recording()
            self.warmups += 1
            self._needs_warmup = False
            logger.info("warm-up %d recorded %d moments; peak non-model %d bytes",
                        self.warmups, len(self.store.schedule or ()), self.store.peak_non_model)
        elif self.mode is TracerMode.STEADY and self.clock.count != len(self.store.schedule or ()):
            self._mark_stale(f"micro-step had {self.clock.count} moments, the schedule "
                             f"{len(self.store.schedule or ())}")

    @property
    def recording(self) -> bool:
        return self.mode is TracerMode.WARMUP

    @property
    def needs_warmup(self) -> bool:
        """The next micro-step will (re)learn the schedule."""
        return self._needs_warmup

    def abandon(self) -> None:
        """An aborted micro-step: drop a half-made recording and warm up again."""
        if self.mode is TracerMode.WARMUP:
            self.store.abandon_recording()
        self._needs_warmup = True

    def mark_stale(self, reason: str) -> None:
        """The schedule no longer describes what runs; warm up again next micro-step."""
        self._mark_stale(reason)

    # -- moments -----------------------------------------------------------------------

    def tick(self, kind: MomentKind, module: str, chunk_bytes_min: int) -> Moment:
        self._close_interval(chunk_bytes_min)
        moment = self.clock.tick(kind, module)
        if self.mode is TracerMode.WARMUP:
            self.store.record_moment(moment)
        elif self.mode is TracerMode.STEADY:
            expected = self.store.expected(moment.index)
            if expected is None or expected.key != moment.key:
                self._mark_stale(f"moment {moment.index} is {moment.kind.value} {moment.module!r}, "
                                 f"the schedule expected "
                                 f"{'nothing' if expected is None else f'{expected.kind.value} {expected.module!r}'}")
        return moment

    def _close_interval(self, chunk_bytes_min: int) -> None:
        peak = self.probe.interval_peak(chunk_bytes_min)
        # what the peak would have been with no saved activation moved to host memory
        # (hetmem/activations): the store keeps that, so a schedule describes the model, not
        # what the last step chose to offload
        natural = max(peak, self.probe.last_natural_peak)
        current = self.clock.current
        if current is None:
            return
        self.last_interval = (current.index, peak)
        if self.mode is TracerMode.WARMUP:
            self.store.note_peak(current.index, natural)
        elif self.mode is TracerMode.STEADY:
            expected = self.store.expected(current.index)
            if expected is not None and natural > expected.non_model_peak * GROWTH_FACTOR + GROWTH_SLACK:
                self._mark_stale(f"non-model peak {natural} B after moment {current.index} exceeds the "
                                 f"recorded {expected.non_model_peak} B (input shapes changed?)")

    def _mark_stale(self, reason: str) -> None:
        logger.info("schedule stale (%s); warming up again next micro-step", reason)
        self.mode = TracerMode.STALE
        self.stale_reason = reason
        self._needs_warmup = True

    def note_access(self, chunk_id: int) -> None:
        if self.mode is TracerMode.WARMUP:
            self.store.note_access(chunk_id)

    # -- what the scheduler asks -------------------------------------------------------

    def current_record(self) -> MomentRecord | None:
        """The recorded record of the current moment, when following the schedule."""
        if self.mode is not TracerMode.STEADY or self.clock.current is None:
            return None
        return self.store.expected(self.clock.current.index)

    def upcoming_record(self) -> MomentRecord | None:
        if self.mode is not TracerMode.STEADY or self.clock.current is None:
            return None
        return self.store.expected(self.clock.current.index + 1)

    def next_use(self, chunk_id: int) -> float | None:
        """Belady's key; None while there is no schedule to follow."""
        if self.mode is not TracerMode.STEADY or self.clock.current is None:
            return None
        return self.store.next_use(chunk_id, self.clock.current.index)
