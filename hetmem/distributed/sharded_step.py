"""The data-parallel parts of an optimizer step, called by ``ChunkedAdam.step`` at three seams.

1. ``reduce_gradients(groups)`` (before the norm):
   a. one small all-gather: every rank's "has a gradient" flag per parameter and its traced
      schedule's fingerprint.  A parameter with a gradient on any rank has one everywhere (the
      others contribute zeros, as DistributedDataParallel does for a parameter one rank did not
      use); a schedule that differs between ranks raises on every rank, naming them.
   b. each group's GRAD chunk (its used prefix, fp32) is reduced (SUM) to the group's owner,
      issued in layout order with up to IN_FLIGHT in flight, each waited only when the window is
      full or all are issued; the owner divides by the world size (DDP's mean) and takes the
      squared norm of each reduced gradient.
   c. one all-reduce (SUM) of the owners' squared norms: the global squared norm, non-finite on
      every rank when any reduced gradient is (fp16 overflow included), so all ranks skip a step
      together and clip with the same coefficient.
2. ``publish_until(index)`` (after the pipeline passes each group): issues, in layout order,
   the broadcast of each updated PARAM chunk from its owner up to group ``index``; a rank
   issues the receives of the groups owned by others as it reaches them, so its own updates
   overlap the others' broadcasts.
3. ``finish()`` (when the pipeline is done): issues the rest and waits for every broadcast.

Nothing here depends on the step's timing: the order of collectives is the layout order on
every rank, whatever runs faster, and the overlapped step (hetmem/step_pipeline.py) is off.
A step an IO error interrupted on one rank resumes as on one process (``engine.step()`` again
applies and publishes the rest; nothing is reduced twice), while the other ranks wait for its
broadcasts, at most the process group's timeout.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Callable

import torch

from hetmem.chunk_manager.chunk import ChunkGroup
from hetmem.chunk_manager.manager import ChunkManager
from hetmem.chunk_manager.states import ChunkKind, TensorState
from hetmem.ops.adam import squared_norm

from .comm import Comm, Pending
from .context import DistContext

logger = logging.getLogger("hetmem.distributed")

# chunk groups whose reduce (or broadcast) is in flight at once: their chunks stay pinned in
# memory meanwhile, so with state on NVMe this bounds the host bytes they hold
IN_FLIGHT = 8


class ScheduleDivergence(RuntimeError):
    """The ranks traced different schedules: their models do not run the same modules."""


class ShardedStep:
    def __init__(self, ctx: DistContext, comm: Comm, manager: ChunkManager, owners: dict[int, int],
                 schedule: Callable[[], list | None]):
        self.ctx = ctx
        self.comm = comm
        self.manager = manager
        self.owners = owners            # group index -> owning rank (trainable groups)
        self._schedule = schedule       # the tracer's last complete schedule (MomentRecords), or None
        self._fingerprint: tuple[int, int] | None = None  # (id(schedule), fingerprint), cached
        self._changed: list[ChunkGroup] = []  # groups reduced this step, in layout order: to publish
        self._cursor = 0                      # how many of them are published
        self._broadcasts: list[Pending] = []  # broadcasts in flight
        self._in_step = False                 # between reduce_gradients and finish
        # Stage 2 (shard_params, gather.py): owners keep their updated PARAM chunks, the others
        # gather them before use, so nothing is broadcast after the step
        self.publish = True
        self.agreed: list | None = None       # the traced schedule every rank had at the last step

    def owns(self, group: ChunkGroup) -> bool:
        return self.owners.get(group.index) == self.ctx.rank

    # -- 1. gradients ----------------------------------------------------------------------

    def reduce_gradients(self, groups: list[ChunkGroup]) -> float:
        """Reduce every group's gradient to its owner; the global squared norm (scaled)."""
        if self._in_step:
            raise RuntimeError(f"hetmem data parallel: rank {self.ctx.rank}: a new step was started while the last "
                               f"one (its gradients already reduced) was not finished; call engine.step() again to "
                               f"finish it, or engine.zero_grad() on every rank to drop it")
        self._agree(groups)
        world = self.ctx.world_size
        reduced = [g for g in groups if any(s.has_grad for s in g.slots)]
        in_flight: list[tuple[ChunkGroup, torch.Tensor, Pending]] = []
        squares: list[torch.Tensor] = []

        def land() -> None:  # the oldest reduce: waited, unpinned, and on its owner averaged
            group, view, work = in_flight.pop(0)
            try:
                work.wait()
            finally:
                self.manager.unpin(group.chunks[ChunkKind.GRAD])
            if self.owns(group):
                view.div_(world)
                squares.extend(squared_norm(view.narrow(0, s.offset, s.numel)) for s in group.slots if s.has_grad)

        try:
            for group in reduced:
                if len(in_flight) >= IN_FLIGHT:
                    land()
                chunk = group.chunks[ChunkKind.GRAD]
                payload = self.manager.payload_in_memory(chunk)
                self.manager.pin(chunk)
                self.manager.mark_dirty(chunk)
                view = payload.narrow(0, 0, group.used)
                in_flight.append((group, view, self.comm.reduce(
                    view, self.owners[group.index], f"the gradient reduce of chunk group {group.index}")))
            while in_flight:
                land()
        finally:
            for group, _, _ in in_flight:  # after an error: nothing stays pinned
                self.manager.unpin(group.chunks[ChunkKind.GRAD])
        mine = torch.stack([s.double() for s in squares]).sum() if squares else torch.zeros((), dtype=torch.float64)
        total = self.comm.all_reduce(mine.reshape(1).cpu(), "the all-reduce of the gradient norm")
        self._changed = reduced
        self._cursor = 0
        self._in_step = True
        return float(total[0])

    def _agree(self, groups: list[ChunkGroup]) -> None:
        slots = [s for g in groups for s in g.slots]
        fingerprint = self._schedule_fingerprint()
        mine = torch.tensor([fingerprint is not None, fingerprint or 0] + [s.has_grad for s in slots],
                            dtype=torch.int64)
        rows = torch.stack(self.comm.all_gather(mine, "the gradient flags and schedule fingerprints"))
        traced = {r: int(rows[r, 1]) for r in range(self.ctx.world_size) if rows[r, 0]}
        if len(set(traced.values())) > 1:
            first = min(traced)
            others = [r for r, f in traced.items() if f != traced[first]]
            raise ScheduleDivergence(
                f"hetmem data parallel: the traced schedule (the order in which modules use chunk groups) of "
                f"rank(s) {others} differs from rank {first}'s; every rank must run the same modules in the same "
                f"order each step (data-dependent control flow that differs between ranks is not supported)")
        # every rank traced the same schedule: the plan the parameter gathers follow (gather.py)
        self.agreed = self._schedule() if len(traced) == self.ctx.world_size else None
        anywhere = rows[:, 2:].amax(dim=0).tolist()
        for slot, flag in zip(slots, anywhere):
            if flag and not slot.has_grad:
                # a gradient on another rank only: this rank contributes zeros, not stale bytes
                chunk = slot.group.chunks[ChunkKind.GRAD]
                payload = self.manager.payload_in_memory(chunk)
                self.manager.mark_dirty(chunk)
                payload.narrow(0, slot.offset, slot.numel).zero_()
                slot.has_grad = True
                slot.set_state(TensorState.HOLD_AFTER_BWD)

    def _schedule_fingerprint(self) -> int | None:
        schedule = self._schedule()
        if schedule is None:
            return None
        if self._fingerprint is not None and self._fingerprint[0] == id(schedule):
            return self._fingerprint[1]
        chunks = {c.id: c for c in self.manager.chunks}
        digest = hashlib.sha256()
        for record in schedule:
            used = sorted(chunks[i].group.index for i in record.working_set
                          if i in chunks and chunks[i].kind is ChunkKind.PARAM)
            digest.update(f"{record.kind.name}|{record.module}|{used};".encode())
        value = int.from_bytes(digest.digest()[:8], "little") >> 1
        self._fingerprint = (id(schedule), value)
        return value

    # -- 2. and 3. updated parameters --------------------------------------------------------

    def publish_until(self, index: int) -> None:
        """Issue the broadcasts of the changed groups up to layout index ``index``."""
        if not self.publish:
            return
        while self._cursor < len(self._changed) and self._changed[self._cursor].index <= index:
            group = self._changed[self._cursor]
            self._cursor += 1
            if len(self._broadcasts) >= IN_FLIGHT:
                self._broadcasts.pop(0).wait()
            chunk = group.chunks[ChunkKind.PARAM]
            payload = self.manager.payload_in_memory(chunk)
            self.manager.pin(chunk)
            if not self.owns(group):
                self.manager.mark_dirty(chunk)
            self._broadcasts.append(self.comm.broadcast(
                payload.narrow(0, 0, group.used), self.owners[group.index],
                f"the broadcast of the updated parameters of chunk group {group.index}",
                on_done=lambda chunk=chunk: self.manager.unpin(chunk)))

    def finish(self) -> None:
        """Issue what is left, wait for every broadcast."""
        try:
            self.publish_until(float("inf"))
            for work in self._broadcasts:
                work.wait()
        finally:
            self._broadcasts.clear()
            self._changed = []
            self._in_step = False

    def reset(self) -> None:
        """No update this step (the agreed norm is not finite, or the gradients are dropped by
        ``zero_grad()`` on every rank after a step that failed part-way): nothing to publish."""
        self._changed = []
        self._broadcasts.clear()
        self._in_step = False
