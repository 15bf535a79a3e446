"""Model weights in and out of the chunks, under the model's own state_dict keys.

Weights come out in full precision: the fp32 master in mixed precision (frozen parameters,
which have no master, are their compute-dtype values widened to fp32), the PARAM chunk in
fp32 training.  A tied weight appears under each of its names, as in ``model.state_dict()``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from torch.nn.modules.module import _IncompatibleKeys

from hetmem.chunk_manager.chunk import ParamSlot
from hetmem.chunk_manager.states import ChunkKind, TensorState

if TYPE_CHECKING:
    from hetmem.chunk_manager.manager import ChunkManager
    from hetmem.engine import Engine


def _weights_chunk(slot: ParamSlot):
    group = slot.group
    return group.chunks.get(ChunkKind.MASTER) or group.chunks[ChunkKind.PARAM]


def read_slot(manager: "ChunkManager", slot: ParamSlot, kind: ChunkKind) -> torch.Tensor:
    """The slot's values in its ``kind`` chunk, wherever that lives, as a new CPU fp32 tensor."""
    payload = manager.payload_in_memory(slot.group.chunk(kind))
    return payload.narrow(0, slot.offset, slot.numel).view(slot.shape).to("cpu", torch.float32, copy=True)


def write_slot(manager: "ChunkManager", slot: ParamSlot, kind: ChunkKind, value: torch.Tensor) -> None:
    """Overwrite the slot's values in its ``kind`` chunk (converted to the chunk's dtype)."""
    chunk = slot.group.chunk(kind)
    payload = manager.payload_in_memory(chunk)
    manager.mark_dirty(chunk)
    with torch.no_grad():
        payload.narrow(0, slot.offset, slot.numel).copy_(value.detach().reshape(-1))


def read_weights(manager: "ChunkManager", slot: ParamSlot) -> torch.Tensor:
    """The slot's full-precision weights as a new CPU fp32 tensor."""
    chunk = _weights_chunk(slot)
    if chunk.kind is ChunkKind.PARAM and slot.state is TensorState.GRAD_IN_SLOT:
        raise RuntimeError(f"parameter {slot.name!r} holds its gradient until engine.step()")
    if chunk.tier is None and chunk.kind is ChunkKind.PARAM:  # hetmem/distributed/gather.py
        raise RuntimeError(f"parameter {slot.name!r} is held by another rank between uses (data parallel with "
                           f"shard_params: true); call engine.state_dict() on every rank (a collective) for the "
                           f"full weights")
    return read_slot(manager, slot, chunk.kind)


def full_state_dict(engine: "Engine") -> "OrderedDict[str, torch.Tensor]":
    """engine.state_dict(): the module's state dict (hetmem/module_state.py), parameters in fp32."""
    return engine.module_state.full_precision_state_dict()


def write_weights(manager: "ChunkManager", slot: ParamSlot, value: torch.Tensor) -> None:
    """Set the slot's weights (master and compute copies) from ``value``."""
    if tuple(value.shape) != tuple(slot.shape):
        raise ValueError(f"size mismatch for {slot.name}: the checkpoint has {tuple(value.shape)}, the model "
                         f"{tuple(slot.shape)}")
    if slot.state is TensorState.GRAD_IN_SLOT:
        raise RuntimeError(f"cannot load weights between engine.backward() and engine.step() "
                           f"({slot.name!r} holds its gradient)")
    for kind in (ChunkKind.MASTER, ChunkKind.PARAM):
        if kind in slot.group.chunks:
            write_slot(manager, slot, kind, value)


def load_full_state_dict(engine: "Engine", state_dict, strict: bool = True) -> _IncompatibleKeys:
    expected = engine.module.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        raise RuntimeError(f"error loading state_dict into {type(engine.module).__name__}: " + "; ".join(parts))
    for key, current in expected.items():
        if key not in state_dict:
            continue
        slot = engine.layout.by_name.get(key)
        if slot is not None:
            write_weights(engine.manager, slot, state_dict[key])
        else:
            value = state_dict[key]
            if tuple(value.shape) != tuple(current.shape):
                raise ValueError(f"size mismatch for {key}: the checkpoint has {tuple(value.shape)}, the model "
                                 f"{tuple(current.shape)}")
            with torch.no_grad():
                current.copy_(value)
    return _IncompatibleKeys(missing, unexpected)
