"""The store: what was measured at each moment of a micro-step, and the recorded schedule.

During warm-up each moment gets a record (its kind and module, the chunks accessed until the
next moment, and the peak non-model bytes in that interval).  When the warm-up micro-step
ends, the records become the schedule that the budget and the eviction policy read.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from .clock import Moment, MomentKind


@dataclass
class MomentRecord:
    kind: MomentKind
    module: str
    working_set: set[int] = field(default_factory=set)  # chunk ids accessed in [this moment, next)
    non_model_peak: int = 0                             # peak non-model bytes in that interval
                                                        # (as if no activation were offloaded)
    offloaded: int = 0                                  # of those, bytes the activation plan keeps
                                                        # in host memory then (hetmem/activations)

    @property
    def device_non_model(self) -> int:
        """Non-model bytes on the device in the interval when the activation plan is followed."""
        return self.non_model_peak - self.offloaded

    @property
    def key(self) -> tuple[MomentKind, str]:
        return (self.kind, self.module)


class ScheduleStore:
    def __init__(self) -> None:
        self.recording: list[MomentRecord] | None = None  # being recorded (warm-up), else None
        self.schedule: list[MomentRecord] | None = None   # the last complete recording
        self._uses: dict[int, list[int]] = {}              # chunk id -> sorted moment indices using it

    # -- recording ---------------------------------------------------------------------

    def start_recording(self) -> None:
        self.recording = []

    def record_moment(self, moment: Moment) -> None:
        assert self.recording is not None
        self.recording.append(MomentRecord(moment.kind, moment.module))

    def note_access(self, chunk_id: int) -> None:
        if self.recording:
            self.recording[-1].working_set.add(chunk_id)

    def note_peak(self, index: int, peak: int) -> None:
        if self.recording is not None and 0 <= index < len(self.recording):
            record = self.recording[index]
            record.non_model_peak = max(record.non_model_peak, peak)

    def finish_recording(self) -> None:
        assert self.recording is not None
        self.schedule, self.recording = self.recording, None
        self._uses = {}
        for index, record in enumerate(self.schedule):
            for chunk_id in record.working_set:
                self._uses.setdefault(chunk_id, []).append(index)

    def abandon_recording(self) -> None:
        self.recording = None

    # -- queries -----------------------------------------------------------------------

    def expected(self, index: int) -> MomentRecord | None:
        if self.schedule is None or index >= len(self.schedule):
            return None
        return self.schedule[index]

    def next_use(self, chunk_id: int, index: int) -> float:
        """Moments from ``index`` until the chunk is next used (the schedule repeats); inf if never."""
        uses = self._uses.get(chunk_id)
        if not uses or self.schedule is None:
            return math.inf
        k = bisect.bisect_right(uses, index)
        if k < len(uses):
            return uses[k] - index
        return uses[0] + len(self.schedule) - index

    @property
    def peak_non_model(self) -> int:
        return max((r.non_model_peak for r in self.schedule or ()), default=0)
