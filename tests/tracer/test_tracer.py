"""The tracer: schedule recording, next use, staleness on a new code path."""
from __future__ import annotations

import math

from hetmem.tracer.budget import BudgetPolicy
from hetmem.tracer.clock import MomentKind
from hetmem.tracer.probes import CpuProbe
from hetmem.tracer.tracer import MemoryTracer, TracerMode

F, B = MomentKind.PRE_FORWARD, MomentKind.PRE_BACKWARD


def _run(tracer, moments):
    tracer.begin_microstep()
    for kind, module, chunks in moments:
        tracer.tick(kind, module, 0)
        for c in chunks:
            tracer.note_access(c)
    tracer.end_microstep(0)


def test_schedule_is_recorded_then_followed():
    tracer = MemoryTracer(CpuProbe(), BudgetPolicy(1 << 20, 0))
    plan = [(F, "a", [0]), (F, "b", [1]), (B, "b", [1]), (B, "a", [0])]
    _run(tracer, plan)
    assert tracer.warmups == 1 and tracer.store.schedule is not None
    tracer.begin_microstep()
    assert tracer.mode is TracerMode.STEADY
    tracer.tick(F, "a", 0)
    assert tracer.next_use(1) == 1 and tracer.next_use(0) == 3 and tracer.next_use(7) == math.inf
    tracer.tick(F, "b", 0)
    assert tracer.next_use(0) == 2  # at moment 1: chunk 0 is next used at moment 3
    tracer.end_microstep(0)


def test_next_use_wraps_to_the_next_microstep():
    tracer = MemoryTracer(CpuProbe(), BudgetPolicy(1 << 20, 0))
    _run(tracer, [(F, "a", [0]), (F, "b", [1]), (B, "b", [1])])
    assert tracer.store.next_use(0, 2) == 1  # after index 2, chunk 0 is used at index 0 of the next


def test_a_different_code_path_marks_the_schedule_stale():
    tracer = MemoryTracer(CpuProbe(), BudgetPolicy(1 << 20, 0))
    _run(tracer, [(F, "a", [0]), (F, "b", [1])])
    tracer.begin_microstep()
    tracer.tick(F, "a", 0)
    tracer.tick(F, "c", 0)
    assert tracer.mode is TracerMode.STALE and "expected pre_forward 'b'" in tracer.stale_reason
    tracer.end_microstep(0)
    tracer.begin_microstep()
    assert tracer.mode is TracerMode.WARMUP


def test_cpu_probe_counts_distinct_storages_while_held():
    import torch

    probe = CpuProbe()
    x = torch.zeros(1024)
    a = probe.hold_saved(x)
    b = probe.hold_saved(x[10:])  # a view of the same storage counts once
    assert probe.live.current == 4096
    del a
    assert probe.live.current == 4096
    del b
    assert probe.live.current == 0
    assert probe.interval_peak(0) == 4096 and probe.interval_peak(0) == 0
