"""The clock: counts moments within one micro-step (forward + backward [+ optimizer]).

A moment is a point where hetmem decides chunk placement: the pre-forward and pre-backward
point of each parameter-owning module, and the optimizer step.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass


class MomentKind(enum.Enum):
    PRE_FORWARD = "pre_forward"
    PRE_BACKWARD = "pre_backward"
    OPTIMIZER = "optimizer"


@dataclass(frozen=True)
class Moment:
    index: int           # position within the micro-step, from 0
    kind: MomentKind
    module: str          # qualified module name ("" for the optimizer)
    t: float             # perf_counter() when it began

    @property
    def key(self) -> tuple[MomentKind, str]:
        """What must match between a recorded schedule and a later micro-step."""
        return (self.kind, self.module)


class MomentClock:
    def __init__(self) -> None:
        self.current: Moment | None = None  # the moment whose interval we are in
        self._next = 0                      # index the next tick gets

    def reset(self) -> None:
        self.current = None
        self._next = 0

    def tick(self, kind: MomentKind, module: str) -> Moment:
        self.current = Moment(self._next, kind, module, time.perf_counter())
        self._next += 1
        return self.current

    @property
    def count(self) -> int:
        """Moments ticked since the last reset."""
        return self._next
