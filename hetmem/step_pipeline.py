"""The optimizer step as a pipeline over chunk groups, applied at once or overlapped.

A step is decided at ``engine.step()`` (hetmem/optimizer.py, ``ChunkedAdam.start``): the
gradient norm, non-finite skip, clipping coefficient, loss scale and every param group's
hyperparameters are fixed then.  What is left is a ``PendingStep``: the chunk groups to
update, in layout order (which is module order, the order the next forward uses them), and
how far it got.  ``StepPipeline`` applies it group by group: while group i is updated, the
next ``read_ahead`` groups are read from NVMe and the groups already updated are written
back as the host budget makes room (``_spill_order``), so ``read_ahead + 2`` groups are in
host memory at a time (the engine sets ``read_ahead`` from ``nvme_pipeline_depth``:
hetmem/nvme/pipeline_plan.py).  The plan keeps room for ``read_ahead`` of the largest group;
where the groups read ahead are smaller (a layer norm's, a 4 MiB projection's), the groups
after them are read too, within that room and only where it is free or held by updated
groups' state (``_read_ahead``), so the disk is not left idle behind a small group (the
synchronous step only: overlapped, the next forward needs that room).  After each group's
update the pipeline also starts the stores that the next ``spill_ahead`` groups' reads will
need room for (``_spill_ahead``: updated groups' optimizer state and gradients, which the
budget would spill next anyway), so a read finds its room freed instead of waiting for a store
issued just before it, and the disk has writes queued while the training thread runs Adam.

Synchronous (``overlap_step: false``, no NVMe tier, or distributed): ``engine.step()`` runs
the pipeline to the end.  Overlapped (the default with the NVMe tier): ``engine.step()`` only
issues the first groups' reads; the next forward waits per group for that group's update,
like any other transfer.  The scheduler (hetmem/scheduler.py) calls
``ChunkedAdam.apply_through`` before it places a module's chunks, which advances the pipeline
through that module's groups (waiting for their reads), and ``ready_for_prefetch`` before it
prefetches the next moment's, which advances only as far as the reads have landed: the
module's compute then runs while the next group's reads and the earlier groups' write-backs
are in flight on the async IO engine.  Everything else that observes weights or optimizer
state (state dicts, checkpoints, a forward without gradients, backward, close,
``engine.last_step``) finishes the pending step first; ``zero_grad()`` keeps it (its
gradients were consumed by ``step()``) unless an IO error interrupted it (then, as without
overlap, the rest is dropped).  One thread: the chunk manager is not thread-safe, and the
pipeline advances only from the main thread's hooks and calls.

During backward (``read_state_early``), the coming step's master weights and Adam moments are
read first groups first, within ``EARLY_READ_SHARE`` of host_budget, room made by spilling
the furthest groups' state (which the step would write back before reading them anyway), so
part of the step's disk work moves into backward without adding a byte.

During backward, with ``step_speculation`` (hetmem/speculation.py), the last layers' groups are
updated speculatively as their gradients complete, their pre-update state kept on NVMe for an
exact rollback; ``engine.step()`` commits them and the pipeline applies only the groups left
(``PendingStep.groups``), or rolls them back and the pipeline applies every group.  Then
speculation replaces the early reads above.  README "Overlapped optimizer step" has the
measurements.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from hetmem.chunk_manager.chunk import Chunk, ChunkGroup
from hetmem.chunk_manager.manager import ChunkManager
from hetmem.chunk_manager.spill import KIND_ORDER
from hetmem.chunk_manager.states import ChunkKind, Tier
from hetmem.nvme.pipeline_plan import SPILL_AHEAD

logger = logging.getLogger("hetmem.step_pipeline")

# groups read from NVMe ahead of the one being updated, unless the engine sets another
# (the NVMe pipeline plan's depth: one group being written back, one updated, these read)
READ_AHEAD_GROUPS = 1
# backward's early reads of optimizer state fill at most this share of host_budget (with what
# spilling later groups' state would free); the rest stays for backward's own reads
EARLY_READ_SHARE = 0.75
# the optimizer's own chunks of a group: read early, before the gradients are complete
STATE_KINDS = (ChunkKind.MASTER, ChunkKind.EXP_AVG, ChunkKind.EXP_AVG_SQ)


def _spillable_state_bytes(group: ChunkGroup) -> int:
    """The bytes of ``group``'s optimizer state in host memory that a spill may take now (not
    pinned, no transfer in flight)."""
    return sum(c.nbytes for kind in STATE_KINDS if (c := group.chunks.get(kind)) is not None
               and c.tier is Tier.HOST and not c.pins and c.transfer is None)


@dataclass
class PendingStep:
    """A step decided at ``engine.step()`` and not applied to every group yet."""

    groups: list[ChunkGroup]              # trainable groups, layout (= module) order
    grad_scale: float                     # divides the gradients: loss scale, and clipping
    norm: float | None                    # the global gradient norm, when computed
    loss_scale: float                     # the loss scale after this step's update
    overlapped: bool                      # applied by the next forward (else by engine.step())
    issued_at: float = field(default_factory=time.perf_counter)
    next: int = 0                         # groups[:next] are updated
    interrupted: bool = False             # an IO error stopped it; the rest applies on retry
    work_s: float = 0.0                   # main-thread seconds spent applying it
    blocked_s: float = 0.0                # of which blocked on transfers
    compute_s: float = 0.0                # of which in the Adam kernels
    moved_bytes: int = 0                  # bytes moved while applying it
    speculated: int = 0                   # groups updated during backward (hetmem/speculation.py)
    position: dict[int, int] = field(default_factory=dict)  # group.index -> index in groups

    def __post_init__(self) -> None:
        self.position = {g.index: i for i, g in enumerate(self.groups)}

    @property
    def done(self) -> bool:
        return self.next >= len(self.groups)

    def last_needed(self, chunks: Iterable[Chunk]) -> int:
        """The furthest position among ``chunks``' groups (-1 when none is in this step)."""
        return max((self.position.get(c.group.index, -1) for c in chunks), default=-1)


class StepPipeline:
    """Applies a ``PendingStep`` group by group with NVMe reads ahead and write-backs behind."""

    def __init__(self, manager: ChunkManager, update_group: Callable[[ChunkGroup, float], None],
                 operand_chunks: Callable[[ChunkGroup], dict]):
        self.manager = manager
        self.update_group = update_group      # ChunkedAdam._step_group: one group's update
        self.operand_chunks = operand_chunks  # the chunks a group's update reads and writes
        self.read_ahead = READ_AHEAD_GROUPS   # groups read ahead of the one being updated
        # the largest group's bytes (the NVMe plan's unit): set, a synchronous step reads ahead
        # that many groups' worth of bytes, so small groups do not leave the disk idle (_read_ahead)
        self.group_bytes: int | None = None
        # groups whose reads get their room made one update ahead (0: when the read needs it)
        self.spill_ahead = SPILL_AHEAD

    def issue(self, pending: PendingStep) -> None:
        """Start reading the first groups' chunks (returns at once)."""
        groups = pending.groups
        try:
            self._work(pending, lambda: self._read_ahead(groups, 0, 1 + self.read_ahead, pending.overlapped))
        except BaseException:
            pending.interrupted = True  # as in _advance: step() applies it, zero_grad() drops it
            raise

    def advance(self, pending: PendingStep, through: int) -> None:
        """Update ``pending.groups[next:through + 1]`` in order (blocking on their reads)."""
        if through < pending.next:
            return
        with torch.profiler.record_function("hetmem::step_groups"):
            self._work(pending, lambda: self._advance(pending, min(through, len(pending.groups) - 1)))

    def _advance(self, pending: PendingStep, through: int) -> None:
        groups = pending.groups
        while pending.next <= through:
            i = pending.next
            try:
                with self.manager.spill_order(self._spill_order(groups, i)):
                    self._read_ahead(groups, i + 1, self.read_ahead, pending.overlapped)
                    self.update_group(groups[i], pending.grad_scale)
            except OSError as exc:
                raise self._interrupted(pending, i, exc) from exc
            except BaseException:
                pending.interrupted = True
                raise
            pending.interrupted = False
            pending.next = i + 1
            logger.debug("step applied to chunk group %d (%d of %d)", groups[i].index, i + 1, len(groups))
            try:  # after next moved on: group i is applied whatever happens here
                self._spill_ahead(groups, i)
            except OSError as exc:
                raise self._interrupted(pending, i + 1, exc) from exc
            except BaseException:
                pending.interrupted = True
                raise

    @staticmethod
    def _interrupted(pending: PendingStep, updated: int, exc: OSError) -> OSError:
        """The error to raise for an IO error after ``updated`` groups of ``pending`` were applied."""
        pending.interrupted = True
        where = "the next forward or " if pending.overlapped else ""
        return OSError(exc.errno, f"the optimizer step was interrupted by an IO error after updating {updated} of "
                                  f"{len(pending.groups)} chunk groups ({exc}); no bytes were lost, but this step "
                                  f"is only partly applied: {where}call engine.step() again to apply the rest "
                                  f"(exact), or load the last checkpoint", getattr(exc, "filename", None))

    def _work(self, pending: PendingStep, body: Callable[[], None]) -> None:
        """Run ``body``, counting its time, blocked time and bytes moved into ``pending``."""
        started, blocked, moved = time.perf_counter(), self.manager.blocked_s, self.manager.moved_bytes
        try:
            body()
        finally:
            pending.work_s += time.perf_counter() - started
            pending.blocked_s += self.manager.blocked_s - blocked
            pending.moved_bytes += self.manager.moved_bytes - moved

    def _read_ahead(self, groups: list[ChunkGroup], start: int, count: int, overlapped: bool = False) -> None:
        """Read ``groups[start:start + count]``, making room as needed; then, while the groups read
        ahead stay within ``read_ahead`` of the largest group's bytes (the room the plan keeps for
        them) and host memory has the room, the groups after those too: a layer norm's group or a
        4 MiB projection's is a fraction of the largest, and reading only it would leave the disk
        idle.  The room for those is free memory or the updated groups' optimizer state (written
        back before its next use anyway), never parameters or state still to be updated: where
        host memory is tight they are not read.  Not while the step is overlapped with the next
        forward, whose parameters need that room (two engines stepped in turn, the 151.5M GPT at
        384 MiB: the waiting pipeline's iteration took 1.16x (median of 10 pairs) with it)."""
        stop = min(len(groups), start + count)
        self._read_ahead_from(groups, start, stop)
        if overlapped or self.group_bytes is None or self.manager.host_limit is None:
            return
        budget = self.read_ahead * self.group_bytes - sum(g.nbytes for g in groups[stop - self.read_ahead:stop])
        manager = self.manager
        # updated groups (before the one being updated, start - 1): their state may make room, and
        # the stores in flight (``_spill_ahead``'s) free theirs as they land
        reclaimable = sum(_spillable_state_bytes(g) for g in groups[:max(0, start - 1)])
        for group in groups[stop:]:
            budget -= group.nbytes
            if budget < 0:
                return
            missing = [c for c in set(self.operand_chunks(group).values())
                       if c.tier is Tier.NVME and c.transfer is None]
            over = manager.host_excess(sum(c.nbytes for c in missing))
            if over > reclaimable:
                return  # it would push out parameters or state still to be updated
            reclaimable -= max(0, over)
            for chunk in missing:
                manager.move(chunk, Tier.HOST, cause="optimizer")

    def _spill_ahead(self, groups: list[ChunkGroup], current: int) -> int:
        """Group ``current`` was just updated: start the stores that the reads of the next
        ``spill_ahead`` groups past the read-ahead will need room for, so that each read finds
        its room freed (or freeing) instead of issuing a store and waiting for it to land while
        the disk has nothing else queued.  Only chunks of groups this step has updated go, in the
        step's spill order (the one a read making its own room would use): their optimizer state
        (written once per step anyway) and gradients; never parameters, never a group still to
        be updated, and only as many bytes as those reads lack once the stores already in flight
        land.  Waits for nothing.  Returns the bytes of the chunks it sent to NVMe.

        Unlike writing every updated group back at once (README "Training with state on NVMe":
        tried and dropped), nothing is written that the budget would not have spilled a moment
        later; the stores are only started one update earlier."""
        manager = self.manager
        first = current + 1 + self.read_ahead  # the group the next update's read-ahead reads
        if not self.spill_ahead or manager.nvme is None or manager.host_limit is None or first >= len(groups):
            return 0
        need = sum(c.nbytes for g in groups[first:first + self.spill_ahead]
                   for c in set(self.operand_chunks(g).values()) if c.tier is Tier.NVME)
        over = manager.host_excess(need)
        if over <= 0:
            return 0
        updated = {g.index for g in groups[:current + 1]}
        candidates = sorted((c for c in manager.chunks if c.group.index in updated and c.kind is not ChunkKind.PARAM
                             and manager.can_spill(c)), key=self._spill_order(groups, current + 1))
        return manager.spill_early(candidates, over)

    def _read_ahead_from(self, groups: list[ChunkGroup], start: int, stop: int) -> None:
        for group in groups[start:stop]:
            for chunk in set(self.operand_chunks(group).values()):
                if chunk.tier is Tier.NVME and chunk.transfer is None:
                    self.manager.move(chunk, Tier.HOST, cause="optimizer")

    def read_state_early(self, groups: list[ChunkGroup]) -> None:
        """Start reading the coming step's master weights and Adam moments from NVMe, first
        groups first, as far as host room allows (called at backward's moments).  Room comes
        only from spilling the optimizer state of later groups, which the step would write back
        before reading those anyway: the disk's work moves into backward, no byte is added."""
        manager = self.manager
        if manager.nvme is None:
            return
        # spillable[i]: optimizer-state bytes of groups[i:] in host memory that a spill may take
        spillable = [0] * (len(groups) + 1)
        for i in range(len(groups) - 1, -1, -1):
            spillable[i] = spillable[i + 1] + _spillable_state_bytes(groups[i])
        taken = 0
        for i, group in enumerate(groups):
            for kind in STATE_KINDS:
                chunk = group.chunks.get(kind)
                if chunk is None or chunk.tier is not Tier.NVME or chunk.transfer is not None:
                    continue
                after = manager.bytes_on(Tier.HOST) + chunk.nbytes
                if after - (spillable[i + 1] - taken) > manager.host_limit * EARLY_READ_SHARE:
                    return  # the rest of host memory stays for backward's own reads
                taken += max(0, after - manager.host_limit)
                manager.move(chunk, Tier.HOST, cause="optimizer")

    @staticmethod
    def spill_between_steps(groups: list[ChunkGroup], current: Callable[[], int]):
        """The spill order from backward's early reads until the step is applied: groups the
        step updated already first (``current()``: the next it updates), then the furthest
        groups' optimizer state (the step reads it last), parameters last."""
        position = {g.index: i for i, g in enumerate(groups)}

        def key(chunk) -> tuple:
            at = position.get(chunk.group.index, -1)
            updated = at < current()
            return (not updated, chunk.kind is ChunkKind.PARAM, 0 if updated else -at, KIND_ORDER[chunk.kind],
                    not chunk.nvme_valid, chunk.last_use)

        return key

    def _spill_order(self, groups: list[ChunkGroup], current: int):
        """While group ``current`` is updated: spill updated groups first (their next use is the
        next step), then those furthest ahead; the current and read-ahead groups last."""
        position = {g.index: i for i, g in enumerate(groups)}
        ahead = self.read_ahead

        def key(chunk) -> tuple:
            at = position.get(chunk.group.index, -1)
            if at < current:
                rank, distance = 0, 0          # already updated (or frozen)
            elif at > current + ahead:
                rank, distance = 1, -at        # needed later in this step: the latest first
            else:
                rank, distance = 2, 0          # being updated or read ahead
            return (rank, KIND_ORDER[chunk.kind], distance, not chunk.nvme_valid, chunk.last_use)

        return key
