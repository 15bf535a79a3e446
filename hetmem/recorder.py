"""Records the run trace behind ``engine.memory_report()`` (format: hetmem/report/schema.py).

Per micro-step: the moments with bytes per tier and chunk kind and the interval's non-model
peak, every chunk move (bytes, start/end, how long compute waited on it, why), every eviction
with its reason, and the time in forward, backward, optimizer and waiting.  It keeps the
warm-up steps and the latest ``KEEP_STEPS`` others, so a long run does not grow it.
"""
from __future__ import annotations

import contextlib
import datetime
import time
from typing import TYPE_CHECKING

import torch

from hetmem.chunk_manager.manager import ChunkEvents
from hetmem.chunk_manager.states import ChunkKind, Tier

if TYPE_CHECKING:
    from hetmem.chunk_manager.manager import ChunkManager
    from hetmem.device import Budgets
    from hetmem.layout import Layout
    from hetmem.tracer.tracer import MemoryTracer

KEEP_STEPS = 16
KEEP_WARMUPS = 4
KINDS = [k.name for k in ChunkKind]


def _moment_dict(record: list) -> dict:
    """[index, kind, module, t, counters, non_model, chunk_budget, peak_total] -> the schema's dict."""
    index, kind, module, t, counters, non_model, budget, peak_total = record
    n = len(KINDS)
    tiers = {tier.value: {KINDS[k]: counters[i * n + k] for k in range(n)} for i, tier in enumerate(Tier)}
    tiers["device"]["non_model"] = non_model
    return {"index": index, "kind": kind, "module": module, "t": t, **tiers, "chunk_budget": budget,
            "peak_total": peak_total}


class Recorder(ChunkEvents):
    def __init__(self, layout: "Layout", budgets: "Budgets", *, device: str, dtype: str, model_name: str):
        # what the trace's header says, fixed at initialize
        self.layout = layout
        self.meta = {"device": device, "dtype": dtype, "model_name": model_name,
                     "device_budget": budgets.device, "host_budget": budgets.host}
        # what it reads at each moment; attach() sets them once the engine has built them
        self.manager: "ChunkManager | None" = None
        self.tracer: "MemoryTracer | None" = None
        self.activations = None             # hetmem/activations' offloader, or None when off
        self.margin = budgets.margin        # floors in the trace are budgets: usable + margin
        self.t0 = time.perf_counter()       # trace times are seconds since this
        self.steps: list[dict] = []         # finished step records
        self.current: dict | None = None    # the step being recorded
        self._pending_moves: list[tuple[dict, object]] = []  # (move record, Transfer) not yet finished
        self.init_seconds = 0.0
        self.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self._next_index = 0

    def attach(self, manager: "ChunkManager", tracer: "MemoryTracer", activations=None) -> None:
        """The chunk manager, tracer and activation offloader this recorder reads (they are
        built after it)."""
        self.manager, self.tracer, self.activations = manager, tracer, activations

    def _now(self) -> float:
        return time.perf_counter() - self.t0

    def on_ready(self, seconds: float) -> None:
        self.init_seconds = seconds

    # -- steps ---------------------------------------------------------------------------

    def begin_microstep(self) -> None:
        if self.current is not None:   # the previous micro-step had no optimizer step
            self._finish()
        self.current = {"step": self._next_index, "warmup": self.tracer.recording, "t_start": self._now(),
                        "t_end": None, "phases": [], "moments": [], "moves": [], "evictions": []}
        self._next_index += 1

    @contextlib.contextmanager
    def phase(self, name: str):
        start = self._now()
        try:
            yield
        finally:
            if self.current is not None:
                self.current["phases"].append({"name": name, "t_start": start, "t_end": self._now()})

    def on_moment(self, moment, scheduler) -> None:
        """A moment whose chunks are in place (bytes are after its fetches).  Kept compact: the
        trace's dicts are built only when trace() is called."""
        if self.current is None:
            return
        self.current["moments"].append([moment.index, moment.kind.value, moment.module, moment.t - self.t0,
                                        self.manager.counters(), 0, scheduler.last_chunk_budget, 0])

    def close_interval(self, peak_total: int) -> None:
        """The previous moment's interval ended: its non-model peak and simultaneous peak."""
        last = self.tracer.last_interval
        if last is None or self.current is None:
            return
        index, peak = last
        moments = self.current["moments"]
        for record in (moments[-1:] if moments and moments[-1][0] == index else reversed(moments)):
            if record[0] == index:
                record[5] = max(record[5], peak)
                record[7] = max(record[7], peak_total)
                break

    def end_step(self, result) -> None:
        if self.current is None:
            return
        manager = self.manager
        non_model = self.tracer.probe.current(manager.bytes_on(Tier.DEVICE))
        phases = [p for p in self.current["phases"] if p["name"] == "optimizer"]
        t = phases[-1]["t_start"] if phases else self._now()
        self.current["moments"].append([len(self.current["moments"]), "optimizer", "", t, manager.counters(),
                                        non_model, None, manager.bytes_on(Tier.DEVICE) + non_model])
        self._finish()

    def abort(self) -> None:
        self.current = None
        self._pending_moves.clear()

    def _finish(self) -> None:
        step = self.current
        self.current = None
        if step is None:
            return
        now = self._now()
        for move, transfer in self._pending_moves:
            transfer.done()
            move["t_end"] = (transfer.t_done - self.t0) if transfer.t_done is not None else now
            move["wait_s"] = transfer.waited_s
        self._pending_moves.clear()
        step["t_end"] = now
        if self.activations is not None:
            step["activations"] = self.activations.take_stats()
        span = {name: sum(p["t_end"] - p["t_start"] for p in step["phases"] if p["name"] == name)
                for name in ("forward", "backward", "optimizer")}
        step["time"] = {"forward_s": span["forward"], "backward_s": span["backward"],
                        "optimizer_s": span["optimizer"],
                        "wait_s": sum(m["wait_s"] for m in step["moves"]),
                        "total_s": now - step["t_start"]}
        self.steps.append(step)
        warm = [s for s in self.steps if s["warmup"]][:KEEP_WARMUPS]
        rest = [s for s in self.steps if not s["warmup"]][-KEEP_STEPS:]
        self.steps = sorted(warm + rest, key=lambda s: s["step"])

    # -- chunk events --------------------------------------------------------------------

    def on_move(self, chunk, src, dst, transfer, cause) -> None:
        if self.current is None:
            return
        move = {"chunk": chunk.id, "kind": chunk.kind.name, "src": src.value, "dst": dst.value,
                "bytes": chunk.nbytes, "t_start": transfer.t_issue - self.t0, "t_end": None,
                "wait_s": 0.0, "cause": cause}
        self.current["moves"].append(move)
        self._pending_moves.append((move, transfer))

    def on_evict(self, chunk, src, dst, reason) -> None:
        if self.current is None:
            return
        moments = self.current["moments"]
        self.current["evictions"].append({"chunk": chunk.id, "kind": chunk.kind.name, "src": src.value,
                                          "dst": dst.value, "t": self._now(),
                                          "moment": moments[-1][0] if moments else -1,
                                          "reason": reason})

    # -- the trace -----------------------------------------------------------------------

    def trace(self) -> dict:
        from hetmem import __version__

        meta, layout = self.meta, self.layout
        referenced = {m["chunk"] for s in self.steps for m in s["moves"]} | \
            {e["chunk"] for s in self.steps for e in s["evictions"]}
        chunks = []
        for group in layout.groups:
            for chunk in group.chunks.values():
                if chunk.tier is None and chunk.id not in referenced:
                    continue  # released (GRAD chunks replaced by in-slot gradients)
                chunks.append({"id": chunk.id, "kind": chunk.kind.name, "group": group.index,
                               "dtype": str(chunk.dtype).replace("torch.", ""),
                               "capacity_elements": chunk.capacity, "used_elements": group.numel,
                               "bytes": chunk.nbytes, "params": [s.name for s in group.slots]})
        nvme = self.manager.nvme if self.manager is not None else None
        return {
            "format": "hetmem-trace", "version": 1,
            "meta": {"hetmem_version": __version__, "torch_version": torch.__version__,
                     "created": self.created, "device": meta["device"], "dtype": meta["dtype"],
                     "budgets": {"device": meta["device_budget"], "host": meta["host_budget"],
                                 "nvme": None if nvme is None else nvme.nbytes},
                     "chunk_elements": layout.chunk_elements,
                     "model": {"name": meta["model_name"], "parameters": layout.numel,
                               "trainable_parameters": layout.trainable_numel}},
            "chunks": chunks,
            **self._activation_floors(),
            "steps": [{**s, "moments": [_moment_dict(m) for m in s["moments"]]} for s in self.steps],
        }

    def _activation_floors(self) -> dict:
        """The smallest device budgets of the last warm-up, with and without activation offload."""
        schedule = self.tracer.store.schedule if self.tracer is not None else None
        if self.activations is None or not schedule:
            return {}
        floors = self.activations.floors(schedule, {c.id: c.nbytes for c in self.manager.chunks})
        return {"activation_offload": {"min_device_budget": floors[0] + self.margin,
                                       "min_device_budget_offload": floors[1] + self.margin}}

    def report(self):
        from hetmem.report import MemoryReport

        return MemoryReport(self.trace())
