"""Where each gradient goes, the moment autograd has produced it.

Two hooks per trainable parameter: a tensor hook just before autograd accumulates the
gradient (it makes sure the parameter has its real shape then, which autograd's layout
checks read), and a post-accumulate hook that moves the gradient into chunk memory and
clears ``param.grad``, so no gradient outlives its hook on the device.

- In-slot (mixed precision, no accumulation, a parameter whose gradient arrives exactly once
  per backward, as the warm-up counted): the low-precision gradient overwrites the
  parameter's own PARAM slot.  Its weights live on in the fp32 master, and the fused Adam
  kernel writes the new weights back into the slot.  Saves a model-sized gradient buffer.
- GRAD chunk (fp32 training, gradient accumulation, a gradient produced more than once, and
  during warm-up while the counts are unknown): accumulated in fp32 in the group's GRAD chunk.

A gradient on an accelerator bound for a chunk in host memory is copied on the copy stream
(``_offload``): no host sync per parameter; the optimizer waits for the chunk.  Adding a second
gradient to a slot waits for the bytes first.

Each parameter's squared gradient norm is taken as its gradient arrives, the same way on
both paths, in every dtype: the step sums them with one host sync to skip a non-finite step
(hetmem/optimizer.py) and, without gradient accumulation, to clip, so a run resumed from a
checkpoint (which warms up on GRAD chunks) computes exactly what the uninterrupted run
(in-slot) computed.  With accumulation the entry is the sum of each micro-step's squared
norm: finite exactly when every gradient was (the clipping norm then comes from the GRAD
chunks).  Cost: one pass over each gradient (``hetmem.ops.adam.squared_norm``: for a 16-bit
gradient on a CPU the op's float64 sum of squares, with no fp32 copy; torch's ``vector_norm``
otherwise; see README "Reliability").
"""
from __future__ import annotations

import functools
import logging

import torch

from hetmem.chunk_manager.chunk import ChunkGroup, ParamSlot
from hetmem.chunk_manager.manager import ChunkManager
from hetmem.chunk_manager.states import ChunkKind, TensorState, Tier
from hetmem.layout import Layout
from hetmem.ops.adam import squared_norm

logger = logging.getLogger("hetmem.grads")


class GradRouter:
    def __init__(self, layout: Layout, manager: ChunkManager, *, mixed: bool, accumulation_steps: int,
                 on_schedule_change, in_slot: bool = True):
        self.layout = layout
        self.manager = manager
        self.mixed = mixed
        # in-slot gradients allowed (off under data parallelism: gradients are reduced from
        # GRAD chunks, and a rank has no master weights for the groups it does not own)
        self.in_slot = in_slot
        self.accumulation_steps = accumulation_steps
        self.accumulating = accumulation_steps > 1  # norm_parts are then sums over micro-steps
        # id(slot) -> squared norm of its gradient (0-d, fp32), until the step or zero_grad
        self.norm_parts: dict[int, torch.Tensor] = {}
        self._on_schedule_change = on_schedule_change
        self.on_arrival = None  # called with the slot before a gradient is routed (hetmem/speculation.py)
        self._shaped: set[int] = set()            # slots given a shaped placeholder for accumulation
        self._handles: list = []
        for slot in layout.slots:
            if slot.trainable:
                p = slot.param
                self._handles.append(p.register_hook(functools.partial(self._before_accumulate, slot)))
                self._handles.append(p.register_post_accumulate_grad_hook(
                    functools.partial(self._after_accumulate, slot)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- policy ------------------------------------------------------------------------

    def use_grad_chunks(self) -> None:
        """Every group accumulates in its GRAD chunk (warm-up, or after a schedule change)."""
        for group in self.layout.groups:
            if group.trainable:
                group.grad_in_slot = False
                grad = group.chunks.get(ChunkKind.GRAD)
                if grad is not None and grad.tier is None:
                    self.manager.place(grad, Tier.HOST)

    def decide_in_slot(self) -> int:
        """After a warm-up step: move eligible groups to in-slot gradients; returns how many."""
        if not self.mixed or self.accumulation_steps != 1 or not self.in_slot:
            return 0
        moved = 0
        for group in self.layout.groups:
            if not group.trainable or group.grad_in_slot:
                continue
            if all(s.expected_fires == 1 for s in group.slots):
                group.grad_in_slot = True
                self.manager.release(group.chunks[ChunkKind.GRAD])
                moved += 1
        return moved

    def record_fire_counts(self) -> None:
        """End of a warm-up backward: how often each gradient arrived."""
        for slot in self.layout.slots:
            if slot.trainable:
                slot.expected_fires = slot.grad_fires

    # -- hooks -------------------------------------------------------------------------

    def _before_accumulate(self, slot: ParamSlot, grad: torch.Tensor):
        param = slot.param
        if param.data.shape != slot.shape:
            # Autograd compares the gradient's layout with the parameter's; an empty
            # placeholder would make it copy.  A zero-stride view of the right shape makes it
            # keep the gradient as is; the post hook takes it away at once.
            param.data = self.manager.placeholder(grad.dtype).new_empty(()).expand(slot.shape)
            self._shaped.add(id(slot))
        return None

    def _after_accumulate(self, slot: ParamSlot, param: torch.Tensor) -> None:
        grad = param.grad
        param.grad = None
        if id(slot) in self._shaped:
            self._shaped.discard(id(slot))
            chunk = slot.group.chunks[ChunkKind.PARAM]
            param.data = chunk.view(slot) if (chunk.bound and slot.state is not TensorState.GRAD_IN_SLOT) \
                else self.manager.placeholder(chunk.dtype)
        if grad is None:
            return
        if self.on_arrival is not None:
            self.on_arrival(slot)
        slot.grad_fires += 1
        group = slot.group
        had_grad = slot.has_grad  # a gradient of an earlier backward is pending (no step between)
        if group.grad_in_slot:
            target = self._into_slot(slot, group, grad)
        else:
            target = self._into_grad_chunk(slot, group, grad)
        self.track_norm(slot, grad, target, had_grad)

    def track_norm(self, slot: ParamSlot, grad: torch.Tensor, target: torch.Tensor, had_grad: bool) -> None:
        """Record the squared norm of the gradient that just arrived (see the module docstring)."""
        if self.accumulating:  # each micro-step's gradient: a finiteness witness, not the norm
            square = squared_norm(grad)
            previous = self.norm_parts.get(id(slot))
            self.norm_parts[id(slot)] = square if previous is None else previous + square.to(previous.device)
        else:
            # the first gradient is the whole gradient unless it was added to a pending one (of
            # this backward or an earlier one since the step): then the norm is the sum's, read
            # where it accumulated, which that path waited for.  Only then: a first gradient's
            # target may be a copy still in flight on the copy stream (_offload)
            source = target if had_grad else grad
            self.norm_parts[id(slot)] = squared_norm(source)

    def _offload(self, chunk, slot: ParamSlot, grad: torch.Tensor) -> torch.Tensor | None:
        """A device gradient bound for a host chunk: copied on the copy stream, no host sync per
        parameter (the optimizer waits for the chunk).  None when it cannot go that way."""
        payload = self.manager.payload_for_slot_copy(chunk)
        if payload is None or grad.device != self.manager.device:
            return None
        target = payload.narrow(0, slot.offset, slot.numel)
        self.manager.copy_into(chunk, target, grad.reshape(-1).to(target.dtype),
                               f"gradient of {slot.name} -> {chunk.name} (host)")
        return target

    def _into_slot(self, slot: ParamSlot, group: ChunkGroup, grad: torch.Tensor) -> torch.Tensor:
        chunk = group.chunks[ChunkKind.PARAM]
        if slot.state is not TensorState.GRAD_IN_SLOT:
            target = self._offload(chunk, slot, grad)
            if target is not None:
                slot.set_state(TensorState.GRAD_IN_SLOT)
                self.manager.unbind_slot(chunk, slot)
                slot.has_grad = True
                return target
        payload = self.manager.payload_in_memory(chunk)
        self.manager.mark_dirty(chunk)
        target = payload.narrow(0, slot.offset, slot.numel)
        if slot.state is TensorState.GRAD_IN_SLOT:
            # A second gradient the warm-up did not see: add it (the weights it needed were
            # rebuilt from the master copy) and go back to GRAD chunks from the next step.
            target.add_(grad.reshape(-1).to(target.device))
            self._on_schedule_change(f"gradient of {slot.name!r} arrived {slot.grad_fires} times, "
                                     f"warm-up saw {slot.expected_fires}")
        else:
            target.copy_(grad.reshape(-1))
            slot.set_state(TensorState.GRAD_IN_SLOT)
            self.manager.unbind_slot(chunk, slot)
        slot.has_grad = True
        return target

    def _into_grad_chunk(self, slot: ParamSlot, group: ChunkGroup, grad: torch.Tensor) -> torch.Tensor:
        chunk = group.chunks[ChunkKind.GRAD]
        if not slot.has_grad:
            target = self._offload(chunk, slot, grad)
            if target is not None:
                slot.has_grad = True
                slot.set_state(TensorState.HOLD_AFTER_BWD)
                return target
        payload = self.manager.payload_in_memory(chunk)  # accumulating: the bytes must be there
        self.manager.mark_dirty(chunk)
        target = payload.narrow(0, slot.offset, slot.numel)
        source = grad.reshape(-1)
        if slot.has_grad:
            target.add_(source.to(device=target.device, dtype=target.dtype))
        else:
            target.copy_(source)
        slot.has_grad = True
        slot.set_state(TensorState.HOLD_AFTER_BWD)
        return target

    def reset_fires(self) -> None:
        for slot in self.layout.slots:
            slot.grad_fires = 0
