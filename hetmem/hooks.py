"""Hooks that give the scheduler its moments and its view of non-model memory.

Module hooks: a pre-forward hook on every module that owns parameters, a forward hook that
releases them and registers a hook on the module's outputs; that output hook fires when the
gradient reaches the module, which is its pre-backward moment (a tensor hook, not an
autograd.Function wrapper, so in-place ops on outputs stay legal).

Saved-tensor hooks (active during ``engine(...)``, and during ``engine.backward`` for what
reentrant activation checkpointing recomputes there; non-reentrant checkpointing keeps its
recomputed tensors in torch's own table, out of their reach): a tensor autograd saves that is a view of
a PARAM chunk is stored as a ``ChunkRef`` (chunk, offset, size, stride) instead of the view,
so an evicted chunk's memory is really freed and the view is rebuilt from wherever the chunk
is when backward unpacks it.  Any other saved tensor is non-model memory: counted by the
probe, and the budget is enforced right then; with activation offload on, the offloader
(hetmem/activations) keeps it and may move it to host memory until backward needs it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator

import torch
from torch import nn

from hetmem.activations import SavedActivation
from hetmem.chunk_manager.chunk import Chunk
from hetmem.chunk_manager.states import ChunkKind, TensorState
from hetmem.scheduler import Scheduler
from hetmem.tracer.probes import storage_key


def iter_tensors(value, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors in a module output: tensors, tuples/lists, dicts (HF ModelOutput), dataclasses."""
    if depth > 8:
        return
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from iter_tensors(item, depth + 1)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from iter_tensors(item, depth + 1)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            yield from iter_tensors(getattr(value, name, None), depth + 1)


class ModuleHooks:
    def __init__(self, scheduler: Scheduler, probe):
        self.scheduler = scheduler
        self.probe = probe
        self._handles: list = []

    def install(self, model: nn.Module, owners) -> None:
        """Moments on the modules that own parameters; output tracking on every module (on the
        CPU an output held by user code or by activation checkpointing is non-model memory)."""
        owners = set(owners)
        for module in model.modules():
            if module in owners:
                self._handles.append(module.register_forward_pre_hook(self._pre_forward))
                self._handles.append(module.register_forward_hook(self._post_forward))
            else:
                self._handles.append(module.register_forward_hook(self._other_forward))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_forward(self, module: nn.Module, args) -> None:
        self.scheduler.pre_forward(module)

    def _other_forward(self, module: nn.Module, args, output) -> None:
        self._track_outputs(output)  # a forward hook's return value would replace the output

    def _track_outputs(self, output) -> list[torch.Tensor]:
        """Count the output's storages as non-model memory; returns the tensors needing grad."""
        if not (self.scheduler.traced and torch.is_grad_enabled()):
            return []
        storages = self.scheduler.manager.device_storages
        needs_grad = []
        for tensor in iter_tensors(output):
            key = storage_key(tensor)
            if key is not None and key[0] not in storages:
                self.probe.hold_output(tensor)
            if tensor.requires_grad and tensor.grad_fn is not None:
                needs_grad.append(tensor)
        self.scheduler.on_non_model_growth()
        return needs_grad

    def _post_forward(self, module: nn.Module, args, output) -> None:
        self.scheduler.post_forward(module)
        needs_grad = self._track_outputs(output)
        if needs_grad:
            fired = [False]

            def pre_backward(grad, module=module, fired=fired):
                if not fired[0]:
                    fired[0] = True
                    self.scheduler.pre_backward(module)
                return None

            for tensor in needs_grad:
                tensor.register_hook(pre_backward)


class ChunkRef:
    """A saved view of a PARAM chunk, kept as coordinates instead of memory."""

    __slots__ = ("chunk", "offset", "size", "stride")

    def __init__(self, chunk: Chunk, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.chunk = chunk
        self.offset = offset  # storage offset in elements
        self.size = size
        self.stride = stride

    def extent(self) -> tuple[int, int]:
        """[start, stop) elements of the chunk the view can touch."""
        if any(s == 0 for s in self.size):
            return self.offset, self.offset
        span = sum((s - 1) * st for s, st in zip(self.size, self.stride))
        return self.offset, self.offset + span + 1


class SavedTensorHooks:
    def __init__(self, scheduler: Scheduler, probe):
        self.scheduler = scheduler
        self.probe = probe
        self.listeners: list = []  # called with each saved non-chunk tensor (hetmem.profile)

    def context(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor):
        key = storage_key(tensor)
        if key is not None:
            chunk = self.scheduler.manager.device_storages.get(key[0])
            if chunk is not None and tensor.dtype == chunk.dtype:
                return ChunkRef(chunk, tensor.storage_offset(), tuple(tensor.size()), tuple(tensor.stride()))
        activations = self.scheduler.activations
        packed = activations.pack(tensor) if activations is not None else None
        if packed is None:
            packed = self.probe.hold_saved(tensor)
        for listener in self.listeners:
            listener(tensor)
        self.scheduler.on_non_model_growth()
        return packed

    def unpack(self, packed) -> torch.Tensor:
        if isinstance(packed, ChunkRef):
            return self._rebuild(packed)
        if isinstance(packed, SavedActivation):
            return self.scheduler.activations.unpack(packed)
        return self.probe.unwrap(packed)

    def _rebuild(self, ref: ChunkRef) -> torch.Tensor:
        chunk = ref.chunk
        self.scheduler.late_fetch(chunk)  # a no-op fetch when the moment already brought it
        start, stop = ref.extent()
        in_slot = [s for s in chunk.group.slots
                   if s.state is TensorState.GRAD_IN_SLOT and s.offset < stop and s.end > start]
        if not in_slot:
            return torch.as_strided(chunk.payload, ref.size, ref.stride, ref.offset)
        # Some weights in this range were replaced by their gradients already (a use the
        # warm-up did not see): rebuild them from the fp32 master copy.
        region = chunk.payload.narrow(0, start, stop - start).clone()
        master = self.scheduler.manager.payload_in_memory(chunk.group.chunks[ChunkKind.MASTER])
        for slot in in_slot:
            lo, hi = max(slot.offset, start), min(slot.end, stop)
            region[lo - start:hi - start].copy_(master.narrow(0, lo, hi - lo))
        return torch.as_strided(region, ref.size, ref.stride, 0)
