"""Create the chunks and fill them from the model, module by module.

A model on the meta device is materialised one module at a time: its parameters become real
fp32 tensors, ``init_fn(module)`` (default: the module's own ``reset_parameters()``) fills
them, the values are copied into the chunks and the temporaries dropped — so host memory
never holds more than one module's parameters beyond the chunks themselves.  Parameters then
become empty placeholders until their chunk is on the compute device.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from hetmem.chunk_manager.chunk import Chunk, ParamSlot
from hetmem.chunk_manager.manager import ChunkManager
from hetmem.chunk_manager.states import ChunkKind, Tier
from hetmem.layout import Layout

logger = logging.getLogger("hetmem.materialize")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
InitFn = Callable[[nn.Module], None]


OPTIMIZER_STATE = (ChunkKind.MASTER, ChunkKind.EXP_AVG, ChunkKind.EXP_AVG_SQ)


def create_chunks(layout: Layout, param_dtype: torch.dtype, *, mixed: bool, grad_chunks: bool,
                  owned: set[int] | None = None) -> None:
    """One chunk per kind per group (not yet placed anywhere).

    ``owned`` (data parallel, hetmem/distributed/ownership.py): the trainable groups whose
    optimizer state lives on this rank; the others get no MASTER/EXP_AVG/EXP_AVG_SQ chunk.
    Their chunk ids stay reserved, so a chunk has the same id on every rank."""
    next_id = 0
    for group in layout.groups:
        kinds = [(ChunkKind.PARAM, param_dtype)]
        if group.trainable:
            if mixed:
                kinds.append((ChunkKind.MASTER, torch.float32))
            kinds += [(ChunkKind.EXP_AVG, torch.float32), (ChunkKind.EXP_AVG_SQ, torch.float32)]
            if grad_chunks:
                kinds.append((ChunkKind.GRAD, torch.float32))
        for kind, dtype in kinds:
            if owned is None or not group.trainable or group.index in owned or kind not in OPTIMIZER_STATE:
                group.chunks[kind] = Chunk(next_id, kind, group, dtype)
            next_id += 1


def _replace_parameter(model: nn.Module, layout: Layout, slot: ParamSlot, new: nn.Parameter) -> None:
    """Swap a Parameter object under every name it has (keeps tied weights tied)."""
    for alias in slot.aliases:
        owner_name, _, attr = alias.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._parameters[attr] = new
    del layout.by_param[id(slot.param)]
    slot.param = new  # module_slots hold slots, so they follow
    layout.by_param[id(new)] = slot


def _materialize_module(model: nn.Module, module: nn.Module, name: str, layout: Layout,
                        init_fn: InitFn | None) -> None:
    """Turn the module's meta parameters and buffers into real CPU fp32 tensors and init them."""
    meta_params = [(n, p) for n, p in module.named_parameters(recurse=False) if p.device.type == "meta"]
    meta_buffers = [(n, b) for n, b in module.named_buffers(recurse=False)
                    if b is not None and b.device.type == "meta"]
    if not meta_params and not meta_buffers:
        return
    if init_fn is None and not callable(getattr(module, "reset_parameters", None)):
        names = ", ".join(n for n, _ in meta_params + meta_buffers)
        raise ValueError(f"module {name or '<root>'!r} ({type(module).__name__}) is on the meta device "
                         f"({names}) and has no reset_parameters(); pass init_fn= to hetmem.initialize "
                         f"to fill its tensors")
    for pname, param in meta_params:
        slot = layout.slot_of(param)
        real = nn.Parameter(torch.empty(param.shape, dtype=torch.float32), requires_grad=param.requires_grad)
        _replace_parameter(model, layout, slot, real)
    for bname, buffer in meta_buffers:
        module._buffers[bname] = torch.empty(buffer.shape, dtype=buffer.dtype)
    with torch.no_grad():
        if init_fn is not None:
            init_fn(module)
        else:
            module.reset_parameters()


def _modules_in_order(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    seen = set()
    for name, module in model.named_modules():
        if id(module) not in seen:
            seen.add(id(module))
            yield name, module


def fill_chunks(model: nn.Module, layout: Layout, manager: ChunkManager, *, init_fn: InitFn | None) -> None:
    """Materialise (if meta), copy every parameter into its chunks, leave placeholders.

    Chunks are placed in host memory group by group; past host_budget the manager spills the
    earlier ones to NVMe, so a model larger than host memory can be created."""
    filled: set[int] = set()
    for name, module in _modules_in_order(model):
        _materialize_module(model, module, name, layout, init_fn)
        for slot in layout.module_slots.get(module, ()):
            if id(slot) in filled:
                continue
            filled.add(id(slot))
            group = slot.group
            for chunk in group.chunks.values():
                if chunk.tier is None:
                    manager.place(chunk, Tier.HOST)
            with torch.no_grad():
                value = slot.param.detach()
                for kind in (ChunkKind.PARAM, ChunkKind.MASTER):
                    if kind in group.chunks:
                        chunk = group.chunks[kind]
                        manager.payload_in_memory(chunk)  # an earlier slot's group may have been spilled
                        manager.mark_dirty(chunk)
                        chunk.view(slot).copy_(value)
            slot.param.data = manager.placeholder(group.chunks[ChunkKind.PARAM].dtype)
    for module in model.modules():
        for bname, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.device.type == "meta":
                raise ValueError(f"buffer {bname!r} of {type(module).__name__} is still on the meta device "
                                 f"after initialisation; fill it in init_fn")


def move_buffers(model: nn.Module, device: torch.device, *, norm_dtype: torch.dtype | None = None) -> int:
    """Buffers live on the compute device (they are small) and keep their dtype, except the
    floating buffers of normalisation layers (BatchNorm/InstanceNorm running statistics) when
    ``norm_dtype`` is given (mixed precision): they take the compute dtype, as under
    ``model.to(dtype)``, so the layer's kernel sees one dtype.  State dicts give them back in
    their original dtype (hetmem/module_state.py)."""
    total = 0
    for module in model.modules():
        cast = norm_dtype if isinstance(module, _NormBase) else None
        for bname, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            dtype = cast if cast is not None and buffer.is_floating_point() else buffer.dtype
            moved = buffer.to(device, dtype)
            module._buffers[bname] = moved
            total += moved.numel() * moved.element_size()
    return total
