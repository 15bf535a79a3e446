"""The optimizer update during backward: speculative, with an exact rollback.

Backward produces gradients last layers first.  Once every gradient of a trainable chunk group
has arrived (each slot fired as often as the warm-up counted, hetmem/grads.py), the group's
update is known except for what is global: the non-finite skip, fp16 overflow, clipping
(README "Reliability").  ``Speculation`` applies it then anyway, with the arguments the step
would use (loss scale, the param groups' hyperparameters read when backward starts), reading
the groups' master weights and Adam moments from NVMe ahead of backward's order (last groups
first: the next group's reads make room; the ``EXTRA_READ_AHEAD`` + read-ahead groups after it
stay within ``READ_SHARE`` of host_budget, the stores that make that room started at once and
their reads issued at a later moment) and writing the updated state back at once, so
the disk works through the whole backward.  ``engine.step()`` then commits it or rolls it back;
what speculation did not reach (the first layers, whose gradients complete last) is applied by
the waiting pipeline (hetmem/step_pipeline.py) during the next forward.

Exactness.  The updated state of a speculated group goes to a *shadow* blob
(chunk_manager/nvme_tier.py): the committed blob keeps the pre-update bytes until the step
commits (a flag flip, no IO).  A group is speculated only when those committed blobs hold its
current state: state dirty in host memory only is written there first (``write_back``: its
later spill then writes nothing, so the write moves earlier rather than adding one).  Rollback forgets the in-memory and shadow copies, restores the step counts
and, in mixed precision, the PARAM slots from the pre-update master weights (as a skip does).
The commit happens only when the step's update is this one: finite norm, the same grad scale
(no clipping, or a norm that does not clip) and the same hyperparameters and param groups.

Gradients.  fp32 training keeps gradients in GRAD chunks, which the update only reads: a
rolled-back group is simply updated again by the pipeline (a *redo*).  Mixed precision keeps
them in the PARAM slot, which the update overwrites with the new weights: such a group can be
rolled back only to "no gradient".  That is exactly a skip; for anything else (clipping, a
hyperparameter changed after backward, a forward / state dict / checkpoint / close / second
backward before ``engine.step()``) the update is rolled back, every gradient of the step is
dropped, and the next ``engine.step()`` raises naming the cause and the fix
(``step_speculation=False``).  Hence the modes: ``"all"`` (every group; ``step_speculation``
"auto" or true without clipping) and ``"kept"`` (with clipping and ``step_speculation=True``: only
groups whose gradients outlive the update, rolled back and redone when the norm clips).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from hetmem.chunk_manager.chunk import ChunkGroup, ParamSlot
from hetmem.chunk_manager.spill import spill_key
from hetmem.chunk_manager.states import ChunkKind, TensorState, Tier
from hetmem.step_pipeline import STATE_KINDS

logger = logging.getLogger("hetmem.speculation")

# speculation's reads for the groups after the next one fill at most this share of host_budget
# (backward's own moves use the rest); the next group's make room if needed.  0.9 and one group
# more than the step's read-ahead, with room made: 0.87-0.95x the iteration of 0.75, none more
# and no room made, at 384 and 768 MiB (benchmarks/speculation_read_ahead.py; README
# "Speculation's read-ahead"; 1.03-1.04x at 256 MiB); 0.85 and 1.0 gained less
READ_SHARE = 0.9
EXTRA_READ_AHEAD = 1


def shadow_kinds(mixed: bool) -> tuple[ChunkKind, ...]:
    """The chunks an update writes and a rollback must restore: the fp32 weights, the moments."""
    return (ChunkKind.MASTER if mixed else ChunkKind.PARAM, ChunkKind.EXP_AVG, ChunkKind.EXP_AVG_SQ)


def speculation_mode(config, distributed: bool) -> str | None:
    """None (off), "all" (every group) or "kept" (groups whose gradients outlive the update)."""
    setting = config.step_speculation
    if setting is False or config.nvme_dir is None or not config.overlap_step \
            or config.gradient_accumulation_steps != 1:
        return None
    if distributed:
        if setting is True:
            logger.warning("step_speculation=True is ignored under data parallelism (the step is never "
                           "overlapped there)")
        return None
    if config.gradient_clipping is None:
        return "all"
    return "kept" if setting is True else None


@dataclass
class _Work:
    """This backward's speculative work, charged to the step it belongs to (``Speculation.charge``)."""

    seconds: float = 0.0   # main-thread seconds at backward's moments
    blocked_s: float = 0.0  # of which blocked on transfers
    kernels_s: float = 0.0  # of which in the Adam kernels
    moved_bytes: int = 0   # bytes moved meanwhile


@dataclass
class _Record:
    """A speculated group and what its rollback restores."""

    group: ChunkGroup
    slots: list[tuple[ParamSlot, int, bool, TensorState]]  # (slot, step, has_grad, state) before
    grads_kept: bool                                         # the gradients outlive the update


class Speculation:
    # wait for a complete group's state instead of leaving it to the step: tests set it, so that
    # what is speculated does not depend on the disk's timing
    blocking = False

    def __init__(self, adam, grads, manager, mode: str | None, *, ready: Callable[[], bool] = lambda: False,
                 read_groups: Callable[[], tuple[list, dict]] | None = None,
                 drop_all: Callable[[], None] | None = None):
        self.adam = adam                  # ChunkedAdam: its group update, operands and hyperparameters
        self.manager = manager
        self.mode = mode
        self.ready = ready                # the backward's gradient counts are known (no warm-up now)
        self.kinds = shadow_kinds(adam.mixed)
        self.read_groups = read_groups    # () -> (hyperparameters, group_of): engine.optimizer's, now
        # engine.zero_grad: a step whose gradients are gone is at its boundary
        self.drop_all: Callable[[], None] = drop_all or adam.drop_gradients
        self.armed = False                # updating groups at backward's moments
        self.in_backward = False
        self.order: list[ChunkGroup] = []  # trainable groups, last first
        self.cursor = 0                   # order[:cursor] are updated or passed over
        self.records: dict[int, _Record] = {}  # group.index -> speculated, not committed
        self.grad_scale = 1.0
        self.hyper: list = []
        self.group_of: dict = {}
        self.lost: str | None = None      # why the next engine.step() raises (gradients gone)
        # figures: groups updated, rolled back, passed over (dirty state), seconds at moments
        self.speculated = self.rolled_back = self.passed = self.last_speculated = self.written_back = 0
        self.work_s = 0.0
        self.work = _Work()               # this backward's, until charged to its step
        # the read-ahead past the next group (_read_ahead; benchmarks/speculation_read_ahead.py
        # sets the round-before values on one of its engines)
        self.read_share, self.extra_read_ahead, self.room_ahead = READ_SHARE, EXTRA_READ_AHEAD, True
        if mode is not None:
            grads.on_arrival = self._on_arrival

    # -- backward ----------------------------------------------------------------------

    def arm(self) -> None:
        """Backward starts: speculate this time if the step's arguments can be known now."""
        self.armed = self.in_backward = False
        if self.mode is None or self.adam.pending is not None or self.records or not self.ready():
            return
        try:
            self.hyper, self.group_of = self.read_groups()
        except ValueError as exc:  # engine.step() raises it
            logger.debug("no speculation: %s", exc)
            return
        self.grad_scale = self.adam.scaler.scale
        self.order = [g for g in reversed(self.adam.layout.groups) if g.trainable]
        self.cursor, self.last_speculated, self.work = 0, 0, _Work()
        self.armed = self.in_backward = True

    def end_backward(self) -> None:
        if self.armed:
            self.on_moment()  # what has landed by now
        self.armed = self.in_backward = False
        if self.lost is not None:  # a gradient arrived twice for an updated in-slot group
            lost = self.lost
            self.adam.drop_gradients()
            self.lost = lost

    def on_moment(self) -> None:
        """A backward moment: update the complete groups whose state has arrived, then read ahead."""
        if not self.armed:
            return
        started, moved = time.perf_counter(), self.manager.moved_bytes
        blocked, compute = self.manager.blocked_s, self.adam._compute_s
        try:
            with self.manager.spill_order(self._spill_key()):
                self._update_ready()
                self._read_ahead()
        except OSError as exc:
            self.armed = False  # the pipeline applies the rest (and meets the error again, if it stays)
            logger.warning("speculative optimizer update stopped by an IO error (%s); the step applies the "
                           "groups it did not reach", exc)
        finally:
            seconds = time.perf_counter() - started
            self.work_s += seconds
            work = self.work
            work.seconds += seconds
            work.blocked_s += self.manager.blocked_s - blocked
            work.kernels_s += self.adam._compute_s - compute
            work.moved_bytes += self.manager.moved_bytes - moved

    def _spill_key(self):
        """While speculating: groups updated (or passed over) first - their next use is the next
        forward's end - then the manager's order (optimizer state before parameters, so far
        groups' state goes before what backward still computes with), the groups being read for
        their update last."""
        position = {g.index: i for i, g in enumerate(self.order)}
        cursor, near = self.cursor, self.cursor + self.adam.pipeline.read_ahead + 1

        def key(chunk) -> tuple:
            at = position.get(chunk.group.index, cursor)
            return (0 if at < cursor else 2 if at < near else 1,) + spill_key(chunk)

        return key

    def charge(self, pending) -> None:
        """Count this backward's speculative work into the step it belongs to (its figures)."""
        work = self.work
        pending.work_s += work.seconds
        pending.blocked_s += work.blocked_s
        pending.compute_s += work.kernels_s
        pending.moved_bytes += work.moved_bytes
        pending.speculated = self.last_speculated
        self.work = _Work()

    def _complete(self, group: ChunkGroup) -> bool:
        return all(s.grad_fires >= (s.expected_fires or 0) for s in group.slots if s.trainable)

    def _committed_current(self, group: ChunkGroup) -> bool:
        """The committed blobs hold (or will hold, once written back) the group's state: the
        rollback source exists."""
        if self.mode == "kept" and group.grad_in_slot:
            return False
        return all((c := group.chunks.get(k)) is not None and (c.tier is Tier.NVME or c.nvme_valid
                                                              or self._can_write_back(c)) for k in self.kinds)

    @staticmethod
    def _can_write_back(chunk) -> bool:
        return chunk.payload is not None and chunk.payload.device.type == "cpu" and chunk.transfer is None

    def _write_back(self, group: ChunkGroup) -> None:
        """State dirty in memory only is written to its committed blob first (the rollback source);
        a spill later finds it clean, so this moves the write earlier rather than adding one."""
        for kind in self.kinds:
            chunk = group.chunks[kind]
            if chunk.tier is not Tier.NVME and not chunk.nvme_valid and self._can_write_back(chunk):
                self.manager.write_back(chunk)
                self.written_back += 1

    def _update_ready(self) -> None:
        while self.cursor < len(self.order):
            group = self.order[self.cursor]
            if not self._complete(group):
                return
            if any(c.transfer is not None and not c.transfer.done() for c in group.chunks.values()):
                return  # a write-back or read in flight: a later moment
            if not any(s.has_grad for s in group.slots) or not self._committed_current(group):
                self.passed += any(s.has_grad for s in group.slots)
                self.cursor += 1
                continue
            self._write_back(group)  # if its state is dirty in memory only (then in flight)
            if any(c.pins for c in self.adam._operand_chunks(group).values()):
                return  # still in use by backward's moment: a later moment
            in_flight = [c for c in group.chunks.values() if c.transfer is not None and not c.transfer.done()]
            if in_flight or not self.adam._arrived(group):
                if not self.blocking:
                    return  # never wait for the disk during backward
                for chunk in in_flight:
                    self.manager.wait(chunk)
                for chunk in set(self.adam._operand_chunks(group).values()):
                    self.manager.payload_in_memory(chunk)
            self.cursor += 1
            self._speculate(group)

    def _speculate(self, group: ChunkGroup) -> None:
        nvme = self.manager.nvme
        shadowed = [group.chunks[k] for k in self.kinds]
        for chunk in shadowed:
            self.manager.wait(chunk)  # landed (arrived); raises a failed transfer's error
        if not all(c.nvme_valid and c.tier is not Tier.NVME for c in shadowed):
            self.passed += 1
            return
        record = _Record(group, [(s, s.step, s.has_grad, s.state) for s in group.slots],
                         grads_kept=not group.grad_in_slot)
        for chunk in shadowed:
            nvme.begin_speculation(chunk)
            chunk.nvme_valid = False  # the shadow holds nothing yet
        self.records[group.index] = record
        adam = self.adam
        saved, (adam.hyper, adam.group_of) = (adam.hyper, adam.group_of), (self.hyper, self.group_of)
        try:
            adam._step_group(group, self.grad_scale)
        except BaseException:
            # raised before its kernels ran (an operand's IO): the gradients and slots are as they
            # were, and what memory holds of the state is dropped for the committed blobs
            del self.records[group.index]
            self._forget_state(group)
            raise
        finally:
            adam.hyper, adam.group_of = saved
        self.speculated += 1
        self.last_speculated += 1
        for chunk in shadowed:  # the updated state goes to the shadow blobs now: next used next step
            if chunk.kind is not ChunkKind.PARAM and chunk.tier is Tier.HOST and not chunk.pins:
                self.manager.move(chunk, Tier.NVME, cause="optimizer")

    def _read_ahead(self) -> None:
        """Read the next groups' (in backward's order) operands: the next one's wherever host memory
        is (spilling by ``_spill_key``), each of the ``read_ahead + extra_read_ahead`` after it once
        all of its reads fit ``read_share`` of host_budget.  When they do not, the stores that make
        that room are started (``_make_room``) and the reads wait for a later moment: the disk
        writes the room while backward computes, instead of after the next update."""
        manager = self.manager
        window = self._window()
        for i, group in enumerate(window):
            self._write_back(group)
            chunks = sorted({c for c in self.adam._operand_chunks(group).values()
                             if c.tier is Tier.NVME and c.transfer is None}, key=lambda c: c.id)
            if i and chunks:
                need, limit = sum(c.nbytes for c in chunks), manager.host_limit * self.read_share
                if manager.bytes_on(Tier.HOST) + need > limit:
                    if self.room_ahead:
                        self._make_room(need, limit, {g.index for g in window})
                    return
            for chunk in chunks:
                manager.move(chunk, Tier.HOST, cause="optimizer", optional=True)  # a failure: left to the step

    def _window(self) -> list[ChunkGroup]:
        """The groups read ahead: the next ones in backward's order that can be speculated."""
        wanted = self.adam.pipeline.read_ahead + 1 + self.extra_read_ahead
        window = []
        for group in self.order[self.cursor:]:
            if len(window) == wanted:
                break
            if self._committed_current(group):
                window.append(group)
        return window

    def _make_room(self, nbytes: int, limit: float, keep: set[int]) -> None:
        """Start storing optimizer state (Adam moments and master weights; never parameters or
        gradients, never a group in ``keep``), in the speculation's spill order, until ``nbytes``
        more fit ``limit`` once the stores in flight land; nothing when those would not be
        enough.  Waits for nothing: what it stores is updated already (written once per step
        anyway) or state that a spill would write when backward or the next reads need the room."""
        manager = self.manager
        over = manager.host_excess(nbytes) + manager.host_limit - limit
        if over <= 0:
            return
        candidates = [c for c in manager.chunks if c.kind in STATE_KINDS and c.group.index not in keep
                      and manager.can_spill(c)]
        if sum(c.nbytes for c in candidates) < over:
            return  # the room is not there to make (parameters fill host_budget): store nothing
        manager.spill_early(sorted(candidates, key=self._spill_key()), over)

    def _on_arrival(self, slot: ParamSlot) -> None:
        """A gradient is about to be routed: one for a group updated already (more than the
        warm-up counted) undoes that group's update first."""
        record = self.records.pop(slot.group.index, None)
        if record is not None and self._rollback_group(record):
            self.lost = (f"the gradient of {slot.name!r} arrived more often than the warm-up counted, after its "
                         f"chunk group had been updated speculatively")

    # -- the step and other observers --------------------------------------------------

    def settle(self, grad_scale: float) -> set[int]:
        """``engine.step()`` with a finite norm: commit the speculated groups when the step's update
        is theirs (returns their indices: the pipeline leaves them out), else roll them back."""
        self.armed = self.in_backward = False
        if not self.records:
            return set()
        if grad_scale == self.grad_scale and self.adam.hyper == self.hyper and self.adam.group_of == self.group_of:
            for record in self.records.values():
                for kind in self.kinds:
                    self.manager.nvme.commit_speculation(record.group.chunks[kind])
            committed, self.records = set(self.records), {}
            return committed
        why = ("gradient clipping scaled this step's gradients" if grad_scale != self.grad_scale else
               "engine.optimizer.param_groups changed between engine.backward() and engine.step()")
        if self.rollback(why, dropping=False):
            reason, self.lost = self.lost, None
            self.drop_all()
            raise RuntimeError(self._message(reason))
        return set()

    def observe(self, why: str) -> None:
        """Something reads weights or optimizer state before the step decided (a forward, a state
        dict, a checkpoint, close, another backward): it sees the state from before the update."""
        if self.records and not self.in_backward:
            self.rollback(why, dropping=False)

    def rollback(self, why: str, *, dropping: bool) -> bool:
        """Undo every speculated group; True when gradients were lost (then every gradient of the
        step is dropped and the next ``engine.step()`` raises, unless ``dropping`` anyway)."""
        self.armed = self.in_backward = False
        records, self.records = list(self.records.values()), {}
        if not records:
            return False
        lost = False
        for record in records:
            lost |= self._rollback_group(record)
        self.rolled_back += len(records)
        logger.info("speculative update of %d chunk groups rolled back: %s", len(records), why)
        if lost and not dropping:
            self.adam.drop_gradients()
            self.lost = (f"{why}, after step_speculation had updated {len(records)} chunk groups during backward "
                         f"with gradients kept in the parameters' slots")
        return lost

    def raise_if_lost(self) -> None:
        """``engine.step()``: raise (once) when this step's gradients were dropped by a rollback."""
        if self.lost is not None:
            reason, self.lost = self.lost, None
            self.drop_all()
            raise RuntimeError(self._message(reason))

    @staticmethod
    def _message(reason: str) -> str:
        return (f"this optimizer step cannot be applied: {reason}. The speculative update was rolled back "
                f"exactly and this step's gradients were dropped (weights, Adam states and step counts are as "
                f"before that backward). Call engine.step() right after engine.backward() and set "
                f"engine.optimizer.param_groups before backward (an LR scheduler after engine.step() does), or "
                f"set step_speculation=False in the config")

    def _rollback_group(self, record: _Record) -> bool:
        """Restore one group as it was before its speculative update; True if gradients were lost."""
        group, manager = record.group, self.manager
        self._forget_state(group)
        had_grad = [s for s, _, has, _ in record.slots if has]
        if self.adam.mixed and had_grad:  # the PARAM slots get the pre-update master weights back
            param = group.chunks[ChunkKind.PARAM]
            p_payload = manager.payload_in_memory(param)
            m_payload = manager.payload_in_memory(group.chunks[ChunkKind.MASTER])
            manager.mark_dirty(param)
            for slot in had_grad:
                p_payload.narrow(0, slot.offset, slot.numel).copy_(m_payload.narrow(0, slot.offset, slot.numel))
        for slot, step, has_grad, state in record.slots:
            slot.step = step
            slot.has_grad = has_grad and record.grads_kept
            if slot.has_grad and state is TensorState.HOLD_AFTER_BWD and slot.state is TensorState.HOLD:
                slot.set_state(state)
        manager.rebind(group.chunks[ChunkKind.PARAM])
        return bool(had_grad) and not record.grads_kept

    def _forget_state(self, group: ChunkGroup) -> None:
        """The group's committed blobs are its state again; memory's copies are dropped."""
        for kind in self.kinds:
            chunk = group.chunks[kind]
            self.manager.nvme.end_speculation(chunk)
            self.manager.revert_to_blob(chunk)

    def stats(self) -> dict:
        return {"speculated_groups": self.speculated, "rolled_back_groups": self.rolled_back,
                "passed_over_groups": self.passed, "last_step_speculated": self.last_speculated,
                "written_back_chunks": self.written_back,
                "backward_seconds": self.work_s}
