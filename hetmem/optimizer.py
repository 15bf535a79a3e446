"""The optimizer step: Adam/AdamW over chunk groups, clipping and fp16 overflow in one sync.

For each trainable group, the contiguous runs of parameters that have a gradient, the same
step count and the same param group (``engine.optimizer.param_groups``, whose hyperparameters
are read at every step: hetmem/optimizer_groups.py) are updated by one kernel call each.  A
group whose chunks are all on an accelerator is updated there with torch ops; every other
group by the fused CPU Adam, which reads the (low-precision) gradient, divides out loss scale
and clipping in the same pass, and writes the new low-precision parameters into the PARAM
chunk.

The step is decided at ``engine.step()`` (``start``: norm, skip, clipping, loss scale) and
applied group by group by hetmem/step_pipeline.py: at once, or overlapped with the next
forward (``overlap_step``), which waits per group for that group's update.

Data parallel (``shard``, hetmem/distributed/sharded_step.py; never overlapped): the squared
norm comes from the gradients reduced to their owners, this rank updates only the groups it
owns (the others' step counts follow), and each group's PARAM chunk is broadcast from its owner
as the pipeline passes it, in layout order on every rank.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from hetmem.chunk_manager.chunk import ChunkGroup, ParamSlot
from hetmem.chunk_manager.manager import ChunkManager
from hetmem.chunk_manager.states import ChunkKind, TensorState, Tier
from hetmem.config import Config
from hetmem.grads import GradRouter
from hetmem.layout import Layout
from hetmem.loss_scaler import LossScaler
from hetmem.ops.adam import squared_norm
from hetmem.speculation import Speculation
from hetmem.step_pipeline import PendingStep, StepPipeline

logger = logging.getLogger("hetmem.optimizer")


@dataclass
class StepResult:
    skipped: bool              # a non-finite gradient norm (any dtype; fp16 overflow): no update happened
    grad_norm: float | None    # global L2 norm of the (unscaled) gradients, when computed
    loss_scale: float
    seconds: float
    io_wait_s: float = 0.0     # of which blocked on transfers (NVMe reads, device copies)
    compute_s: float = 0.0     # of which in the Adam kernels
    io_bytes: int = 0          # bytes read + written by NVMe and device transfers during the step
    reason: str | None = None  # why the step was skipped (None when it was applied)
    overlapped: bool = False   # applied by the next forward; ``seconds`` counts the work, not the wait
    speculated: int = 0        # chunk groups updated during backward (hetmem/speculation.py), counted above


@dataclass(frozen=True)
class AdamHyper:
    """One param group's hyperparameters for one step (torch.optim.Adam/AdamW semantics)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool               # AdamW: decoupled weight decay; else Adam's L2 in the gradient
    bias_correction: bool = True


def grad_runs(group: ChunkGroup, group_of: dict[int, int] | None = None
              ) -> list[tuple[int, int, int, list[ParamSlot]]]:
    """(start, stop, step, slots): maximal runs of adjacent slots with a gradient and equal step.

    With ``group_of`` (id(slot) -> param group index) runs also break where the param group
    changes, and slots in no param group are left out (they are not trained, as in torch)."""
    runs: list[tuple[int, int, int, list[ParamSlot]]] = []
    current: list[ParamSlot] = []

    def member(slot: ParamSlot) -> bool:
        return slot.has_grad and (group_of is None or id(slot) in group_of)

    def same_group(a: ParamSlot, b: ParamSlot) -> bool:
        return group_of is None or group_of[id(a)] == group_of[id(b)]

    for slot in group.slots:
        if member(slot) and current and current[-1].step == slot.step and same_group(current[-1], slot):
            current.append(slot)
            continue
        if current:
            runs.append((current[0].offset, current[-1].end, current[0].step, current))
        current = [slot] if member(slot) else []
    if current:
        runs.append((current[0].offset, current[-1].end, current[0].step, current))
    return runs


def _sum_in_order(parts: list[torch.Tensor]) -> torch.Tensor:
    """Sum 0-d tensors from any devices in float64, in list order, with one copy per device."""
    values = [None] * len(parts)
    by_device: dict[torch.device, list[int]] = {}
    for i, part in enumerate(parts):
        by_device.setdefault(part.device, []).append(i)
    for device, indices in by_device.items():
        stacked = torch.stack([parts[i].double() for i in indices]).cpu()
        for i, value in zip(indices, stacked):
            values[i] = value
    return torch.stack(values).sum()


class ChunkedAdam:
    def __init__(self, layout: Layout, manager: ChunkManager, config: Config, device: torch.device,
                 scaler: LossScaler, grads: GradRouter, *, overlap: bool = False, shard=None):
        self.layout = layout
        # data parallel (hetmem/distributed/sharded_step.py): which groups this rank updates,
        # the reduced gradients' norm, the updated parameters' broadcast; None in one process
        self.shard = shard
        self.manager = manager
        self.config = config
        # Param groups: id(slot) -> group index, and each group's hyperparameters for the
        # coming step.  engine.optimizer (hetmem/optimizer_groups.py) sets both before every
        # step from its param_groups; until then one group from config.optimizer holds every
        # trainable parameter.
        self.group_of: dict[int, int] = {id(s): 0 for s in layout.slots if s.trainable}
        adam = config.optimizer
        self.hyper: list[AdamHyper] = [AdamHyper(adam.lr, adam.betas[0], adam.betas[1], adam.eps,
                                                 adam.weight_decay, adam.decoupled, adam.bias_correction)]
        self.device = device
        self.scaler = scaler
        self.grads = grads
        self.mixed = config.mixed_precision
        self.last_norm: float | None = None
        # apply steps group by group during the next forward (config.overlap_step; the engine
        # turns it off when distributed)
        self.overlap = overlap
        # late-bound, so a patched _step_group (tests inject IO errors) is the one called
        self.pipeline = StepPipeline(manager, lambda group, scale: self._apply_group(group, scale),
                                     self._operand_chunks)
        # the step decided at engine.step() and not applied to every group yet (overlapped, or
        # interrupted by an IO error); None otherwise
        self.pending: PendingStep | None = None
        self.last_result: StepResult | None = None  # the last finished step's figures
        self._compute_s = 0.0
        # the update during backward (hetmem/speculation.py); the engine replaces this one (off)
        self.speculation = Speculation(self, grads, manager, None)

    # -- the step ------------------------------------------------------------------------

    def step(self) -> StepResult | None:
        """Decide the step and apply it (``overlap`` off), or leave it pending for the next
        forward (returns None then; ``finish_pending`` applies the rest).  A step that an IO
        error interrupted is resumed instead: calling it again applies the rest, exactly.

        Non-finite gradients (docs: README "Reliability"): the squared norms taken as gradients
        arrived (hetmem/grads.py) are summed with one host sync in every dtype; when the sum is
        not finite the step changes nothing - weights, Adam moments, per-parameter step counts -
        and the pending gradients are dropped, in-slot ones replaced by the master weights again
        (``drop_gradients``).  fp16 also lowers its loss scale.  The result says why.
        """
        if self.pending is None:
            skipped = self.start()
            if skipped is not None:
                self.last_result = skipped
                return skipped
            if self.pending.overlapped:
                return None
        return self.finish_pending()

    def start(self) -> StepResult | None:
        """Decide the step from the gradients (all arrived) and the hyperparameters now; start
        reading its first groups.  Returns the result of a skipped step, else None (pending)."""
        started = time.perf_counter()
        groups = [g for g in self.layout.groups if g.trainable]
        squares = self._sum_of_squares(groups) if self.shard is None else self.shard.reduce_gradients(groups)
        if not math.isfinite(squares):
            reason = self._skip(groups, squares)
            return StepResult(True, math.inf if squares == math.inf else math.nan, self.scaler.scale,
                              time.perf_counter() - started, reason=reason)
        norm = None
        if self.shard is not None:  # the reduced gradients' norm, the same on every rank
            norm = math.sqrt(squares) / self.scaler.scale
        elif self.config.gradient_clipping is not None or not self.grads.accumulating:
            norm = self._global_norm(groups, squares)
        grad_scale = self.scaler.scale
        clip = self.config.gradient_clipping
        if clip is not None and norm is not None:
            coef = clip / (norm + 1e-6)
            if coef < 1.0:
                grad_scale = grad_scale / coef
        committed = self.speculation.settle(grad_scale)  # updated during backward: left out
        groups = [g for g in groups if g.index not in committed]
        self.grads.norm_parts.clear()
        self.scaler.update(overflow=False)
        self.last_norm = norm
        self.pending = PendingStep(groups, grad_scale, norm, self.scaler.scale, overlapped=self.overlap,
                                   issued_at=started)
        self.pipeline.issue(self.pending)
        self.pending.work_s = time.perf_counter() - started
        self.speculation.charge(self.pending)
        return None

    def apply_through(self, chunks) -> None:
        """The scheduler is about to place ``chunks``: apply the pending step to their groups
        (and every group before them) first.  A no-op when nothing is pending."""
        pending = self.pending
        if pending is not None:
            self._advance(pending, pending.last_needed(chunks))
        else:
            self.speculation.observe("a forward ran between engine.backward() and engine.step()")

    def ready_for_prefetch(self, chunks: list) -> list:
        """The scheduler would prefetch ``chunks``: apply the pending step to their groups as far
        as the groups' operands have arrived (never waiting for the disk); returns the chunks
        whose groups are updated (the rest is fetched, and updated, when its moment comes)."""
        pending = self.pending
        if pending is None:
            self.speculation.observe("a forward ran between engine.backward() and engine.step()")
            return chunks
        through = pending.last_needed(chunks)
        while pending.next <= through and self._arrived(pending.groups[pending.next]):
            self._advance(pending, pending.next)
        if self.pending is None:
            return chunks
        return [c for c in chunks if pending.position.get(c.group.index, -1) < pending.next]

    def _arrived(self, group: ChunkGroup) -> bool:
        """Every chunk the group's update reads is in memory with no transfer in flight (a query)."""
        return all(c.tier is not Tier.NVME and (c.transfer is None or c.transfer.done())
                   for c in self._operand_chunks(group).values())

    def read_state_early(self) -> None:
        """A backward moment: start reading the coming step's optimizer state from NVMe, first
        groups first, as far as host room allows (overlap on; hetmem/step_pipeline.py), or
        update the complete last groups speculatively (hetmem/speculation.py)."""
        if self.speculation.armed:
            self.speculation.on_moment()
            return
        if not self.overlap or self.pending is not None or self.manager.nvme is None:
            return
        groups = [g for g in self.layout.groups if g.trainable]
        if self.manager.spill_preference is None:  # until the step is applied (_advance)
            self.manager.spill_preference = self.pipeline.spill_between_steps(
                groups, lambda: 0 if self.pending is None else self.pending.next)
        self.pipeline.read_state_early(groups)

    def finish_pending(self) -> StepResult | None:
        """Apply the rest of the pending step; its figures (None when nothing was pending)."""
        pending = self.pending
        if pending is None:
            self.speculation.observe("the weights or optimizer state were read (a state dict, checkpoint, "
                                     "evaluation, engine.last_step, close or another backward) between "
                                     "engine.backward() and engine.step()")
            return None
        self._advance(pending, len(pending.groups) - 1)
        return self.last_result

    @property
    def last_grad_norm(self) -> float | None:
        """The last step's gradient norm, known at ``engine.step()`` (a query: finishes nothing)."""
        if self.pending is not None:
            return self.pending.norm
        return None if self.last_result is None else self.last_result.grad_norm

    @property
    def last_skipped(self) -> bool:
        """Whether the last step was skipped (decided at ``engine.step()``; a pending one was not)."""
        return self.pending is None and self.last_result is not None and self.last_result.skipped

    def _advance(self, pending: PendingStep, through: int) -> None:
        compute_before = self._compute_s
        try:
            self.pipeline.advance(pending, through)
        finally:
            pending.compute_s += self._compute_s - compute_before
        if pending.done:
            if self.shard is not None:
                self.shard.finish()  # every broadcast landed
            self.pending = None
            self.manager.spill_preference = None  # set by read_state_early
            self.last_result = StepResult(False, pending.norm, pending.loss_scale, pending.work_s,
                                          io_wait_s=pending.blocked_s, compute_s=pending.compute_s,
                                          io_bytes=pending.moved_bytes, overlapped=pending.overlapped,
                                          speculated=pending.speculated)

    def _moved_bytes(self) -> int:
        return self.manager.moved_bytes

    def _grad_chunk(self, group: ChunkGroup):
        return group.chunks[ChunkKind.PARAM] if group.grad_in_slot else group.chunks[ChunkKind.GRAD]

    def _sum_of_squares(self, groups: list[ChunkGroup]) -> float:
        """Sum of the squared (scaled) gradient norms taken as gradients arrived: one host sync.

        Without gradient accumulation it is the squared global norm; with accumulation, the sum
        over micro-steps (hetmem/grads.py), finite exactly when every gradient was finite.
        Summed in float64 in layout order over the slots holding a gradient entry (a retried
        step resumes its ``PendingStep``, which keeps the norm it was decided with).
        """
        parts = [self.grads.norm_parts[id(s)] for g in groups for s in g.slots if id(s) in self.grads.norm_parts]
        return float(_sum_in_order(parts)) if parts else 0.0

    def _global_norm(self, groups: list[ChunkGroup], squares: float) -> float:
        """The global L2 norm of the unscaled gradients.

        Without accumulation from the squares taken as gradients arrived, so the result does
        not depend on where the gradients were kept; with accumulation from the GRAD chunks.
        """
        if not self.grads.accumulating:
            return math.sqrt(squares) / self.scaler.scale
        parts = []
        for group in groups:
            runs = grad_runs(group)
            if runs:
                payload = self.manager.payload_in_memory(group.chunks[ChunkKind.GRAD])
                parts += [squared_norm(payload.narrow(0, start, stop - start)) for start, stop, _, _ in runs]
        if not parts:
            return 0.0
        return math.sqrt(float(_sum_in_order(parts))) / self.scaler.scale

    def _skip(self, groups: list[ChunkGroup], squares: float) -> str:
        """A non-finite gradient norm: no update at all; returns why (logged)."""
        self.drop_gradients(groups)
        if self.config.uses_loss_scaling:
            reason = f"fp16 overflow: gradient norm is {math.sqrt(squares)} at loss scale {self.scaler.scale:g}"
            self.scaler.update(overflow=True)
            if self.scaler.dynamic:  # routine while the dynamic scale finds its level
                logger.info("optimizer step skipped (%s); loss scale lowered to %g", reason, self.scaler.scale)
                return reason
        else:
            reason = f"non-finite gradient norm ({math.sqrt(squares)})"
            self.scaler.update(overflow=True)
        logger.warning("optimizer step skipped (%s): weights, Adam states and step counts unchanged; "
                       "check the loss and learning rate if this repeats", reason)
        return reason

    def drop_gradients(self, groups: list[ChunkGroup] | None = None) -> int:
        """Forget every pending gradient without updating anything; returns the groups touched.

        In-slot gradients (mixed precision only: fp32 training keeps gradients in GRAD chunks
        and its weights in the PARAM slot, untouched) are overwritten with the fp32 master
        weights cast to the compute dtype - the value the last step wrote there.  Groups with
        nothing pending are not touched (no chunk moves).  A speculative update is rolled back first.
        """
        self.speculation.rollback("the gradients were dropped (a skipped step or engine.zero_grad())", dropping=True)
        self.speculation.lost = None
        if self.pending is not None:
            if not self.pending.interrupted:
                return 0  # its gradients were consumed at engine.step(); the next forward applies them
            logger.warning("the rest of the step an IO error interrupted (%d of %d chunk groups) is dropped",
                           len(self.pending.groups) - self.pending.next, len(self.pending.groups))
            self.pending = None
        if groups is None:
            groups = [g for g in self.layout.groups if g.trainable]
        touched = 0
        for group in groups:
            in_slot = self._restore_in_slot(group, group.slots)
            if in_slot or any(s.has_grad or s.state is not TensorState.HOLD for s in group.slots):
                self._finish_group(group, stepped=False)
                touched += 1
        self.grads.norm_parts.clear()
        if self.shard is not None:
            self.shard.reset()
        return touched

    def _on_device(self, group: ChunkGroup) -> bool:
        return self.manager.accelerator.separate_memory and all(
            c.tier is Tier.DEVICE for c in group.chunks.values() if c.tier is not None)

    def _apply_group(self, group: ChunkGroup, grad_scale: float) -> None:
        """The pipeline's step for one group: the update, or under data parallelism the update
        on the group's owner and the step counts elsewhere, then its broadcast issued."""
        if self.shard is None:
            self._step_group(group, grad_scale)
            return
        self._step_group(group, grad_scale, update=self.shard.owns(group))
        self.shard.publish_until(group.index)

    def _step_group(self, group: ChunkGroup, grad_scale: float, update: bool = True) -> None:
        runs = grad_runs(group, self.group_of)
        ungrouped = [s for s in group.slots if s.has_grad and id(s) not in self.group_of]
        if ungrouped:
            self._drop_grads(group, ungrouped)
        if runs and update:
            chunks = self._operands(group)  # in memory and pinned
            for chunk in set(chunks.values()):
                self.manager.mark_dirty(chunk)
            try:
                for start, stop, step, slots in runs:
                    hyper = self.hyper[self.group_of[id(slots[0])]]
                    self._update(chunks, start, stop, step + 1, grad_scale, hyper)
            finally:
                for chunk in set(chunks.values()):
                    self.manager.unpin(chunk)
        self._finish_group(group, stepped=True)

    def _drop_grads(self, group: ChunkGroup, slots: list[ParamSlot]) -> None:
        """Parameters in no param group are not trained (as in torch): their gradients are
        dropped, and in-slot gradients give their slots back to the master weights."""
        self._restore_in_slot(group, slots)
        for slot in slots:
            slot.has_grad = False

    def _restore_in_slot(self, group: ChunkGroup, slots: list[ParamSlot]) -> list[ParamSlot]:
        """Overwrite the in-slot gradients among ``slots`` with the fp32 master weights (cast to
        the compute dtype: what the last step wrote there); returns those slots."""
        in_slot = [s for s in slots if s.state is TensorState.GRAD_IN_SLOT]
        if in_slot:
            param = group.chunks[ChunkKind.PARAM]
            p_payload = self.manager.payload_in_memory(param)
            m_payload = self.manager.payload_in_memory(group.chunks[ChunkKind.MASTER])
            self.manager.mark_dirty(param)
            for slot in in_slot:
                p_payload.narrow(0, slot.offset, slot.numel).copy_(m_payload.narrow(0, slot.offset, slot.numel))
        return in_slot

    def _operand_chunks(self, group: ChunkGroup) -> dict:
        if self.shard is not None and not self.shard.owns(group):
            return {}  # another rank updates it: nothing to read here
        names = {"param": group.chunks[ChunkKind.PARAM], "grad": self._grad_chunk(group),
                 "exp_avg": group.chunks[ChunkKind.EXP_AVG], "exp_avg_sq": group.chunks[ChunkKind.EXP_AVG_SQ]}
        if self.mixed:
            names["master"] = group.chunks[ChunkKind.MASTER]
        return names

    def _operands(self, group: ChunkGroup) -> dict:
        """The chunks the update reads and writes, in memory where it will run, pinned there
        (bringing one in must not spill another); the caller unpins them."""
        names = self._operand_chunks(group)
        chunks = set(names.values())
        if self.manager.accelerator.separate_memory and not self._on_device(group):
            # the CPU Adam runs on the host: every operand still on the device comes over (the
            # PARAM chunk with its in-slot gradients; after "everything fits" and a new warm-up,
            # the master and Adam states too, while the gradients went to the host)
            for chunk in sorted((c for c in chunks if c.tier is Tier.DEVICE), key=lambda c: c.id):
                self.manager.move(chunk, Tier.HOST, cause="optimizer")
        for chunk in chunks:  # start every read before waiting for any
            if chunk.tier is Tier.NVME and chunk.transfer is None:
                self.manager.move(chunk, Tier.HOST, cause="optimizer")
        pinned = []
        try:
            for chunk in chunks:
                self.manager.payload_in_memory(chunk)
                self.manager.pin(chunk)
                pinned.append(chunk)
        except BaseException:
            for chunk in pinned:
                self.manager.unpin(chunk)
            raise
        return names

    def _update(self, chunks, start: int, stop: int, step: int, grad_scale: float, hyper: AdamHyper) -> None:
        n = stop - start
        flat = {k: c.flat(start, stop) for k, c in chunks.items()}
        weights = flat["master"] if self.mixed else flat["param"]
        out = flat["param"] if self.mixed else None
        kwargs = dict(step=step, lr=hyper.lr, beta1=hyper.beta1, beta2=hyper.beta2, eps=hyper.eps,
                      weight_decay=hyper.weight_decay, decoupled=hyper.decoupled, grad_scale=grad_scale,
                      out=out, bias_correction=hyper.bias_correction)
        self.manager.accelerator.check_colocated(*flat.values())
        if not (self.manager.accelerator.separate_memory and all(c.tier is Tier.DEVICE for c in chunks.values())):
            from hetmem.ops.adam import adam_step
        else:
            from hetmem.ops.adam import torch_adam_step as adam_step
        started = time.perf_counter()
        adam_step(weights, flat["grad"], flat["exp_avg"], flat["exp_avg_sq"], **kwargs)
        self._compute_s += time.perf_counter() - started
        logger.debug("adam on %d elements [%d, %d) step %d", n, start, stop, step)

    def _finish_group(self, group: ChunkGroup, stepped: bool) -> None:
        for slot in group.slots:
            if stepped and slot.has_grad:
                slot.step += 1
            slot.has_grad = False
            if slot.state is not TensorState.HOLD:
                slot.set_state(TensorState.HOLD)
        self.manager.rebind(group.chunks[ChunkKind.PARAM])
