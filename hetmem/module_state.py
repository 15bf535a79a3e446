"""The model is the model: ``engine.module.state_dict()`` / ``load_state_dict()`` go to the chunks.

While hetmem trains a model, its parameters' ``.data`` are empty placeholders unless their chunk
is on the compute device.  Hooks on every module make the module's own state-dict methods see
the real weights anyway, so ``torch.save(model.state_dict())``, ``model.save_pretrained()`` and
PEFT's ``get_peft_model_state_dict`` just work:

- ``state_dict()``: each parameter comes from its chunks (the fp32 master where one exists),
  as a CPU tensor in the dtype the parameter had before ``hetmem.initialize``, under the
  model's own keys; a tied weight is one tensor under each of its names.  Buffers are torch's
  own, cast back to their original dtype where hetmem changed it (normalisation statistics in
  mixed precision, hetmem/materialize.py).  ``keep_vars=True`` keeps torch's meaning -- the
  live ``Parameter`` objects, whose ``.data`` are placeholders unless resident -- so callers
  that want values must use the default ``keep_vars=False``.
- ``load_state_dict(sd)``: each parameter's value is written into its chunks (master and
  compute copy) by a load pre-hook, which then hands torch the parameter itself, so torch's
  own copy (or ``assign=True``) changes nothing and its key checks, ``strict`` and error
  messages stay torch's.

``give_back_weights`` runs at ``engine.close()``: the parameters become ordinary CPU tensors
again (original dtype) and buffers return to the host in their original dtype.
"""
from __future__ import annotations

import functools
import logging
import weakref
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from hetmem.chunk_manager.chunk import ParamSlot
from hetmem.chunk_manager.manager import ChunkManager
from hetmem.host_memory import available_host_bytes
from hetmem.layout import Layout
from hetmem.state import read_weights, write_weights
from hetmem.units import format_bytes

logger = logging.getLogger("hetmem.module_state")


class ModuleStateHooks:
    """Built before the model's tensors change, so it records their original dtypes."""

    def __init__(self, model: nn.Module, layout: Layout):
        self.model = model
        self.layout = layout
        self.manager: ChunkManager | None = None      # set by install(); chunks are read through it
        # id(slot) -> dtype of the user's parameter at initialize (state dicts give it back)
        self.param_dtypes = {id(s): s.param.dtype for s in layout.slots}
        # (id(module), buffer name) -> dtype at initialize
        self.buffer_dtypes = {(id(m), n): b.dtype for m in model.modules()
                              for n, b in m._buffers.items() if b is not None}
        self.param_dtype_override: torch.dtype | None = None  # engine.state_dict(): fp32 throughout
        self._tied: tuple[weakref.ref, dict[int, weakref.ref]] | None = None  # one state_dict's tied tensors
        self._handles: list = []
        # called before chunks are read or written: the engine's pending optimizer step is
        # finished first (hetmem/step_pipeline.py)
        self.before_access: Callable[[], object] = lambda: None

    def install(self, manager: ChunkManager) -> None:
        self.manager = manager
        for module in self.model.modules():
            # torch marks public state-dict hooks with an attribute, which a bound method cannot take
            self._handles.append(module.register_state_dict_post_hook(functools.partial(self._after_state_dict)))
            if module._parameters:
                self._handles.append(module.register_load_state_dict_pre_hook(self._before_load))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- state_dict ----------------------------------------------------------------------

    def full_precision_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """The model's state dict with every parameter in fp32 and every tensor a CPU copy."""
        self.param_dtype_override = torch.float32
        try:
            state = self.model.state_dict()
        finally:
            self.param_dtype_override = None
        params = set(self.layout.by_name)
        return OrderedDict((k, v if k in params else v.to("cpu", copy=True)) for k, v in state.items())

    def _after_state_dict(self, module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
        if module._parameters:
            self.before_access()
        for name, param in module._parameters.items():
            key = prefix + name
            if param is None or key not in state_dict or state_dict[key] is param:  # keep_vars=True
                continue
            slot = self.layout.by_param.get(id(param))
            if slot is not None:
                state_dict[key] = self._weights(slot, state_dict)
        for name, buffer in module._buffers.items():
            key = prefix + name
            original = self.buffer_dtypes.get((id(module), name))
            if buffer is None or key not in state_dict or state_dict[key] is buffer or original is None:
                continue
            if state_dict[key].dtype != original:
                state_dict[key] = state_dict[key].to(original)

    def _weights(self, slot: ParamSlot, state_dict) -> torch.Tensor:
        dtype = self.param_dtype_override or self.param_dtypes[id(slot)]
        if len(slot.aliases) == 1:
            return read_weights(self.manager, slot).to(dtype)
        # a tied weight: one tensor under each name within one state_dict() call
        try:
            if self._tied is None or self._tied[0]() is not state_dict:
                self._tied = (weakref.ref(state_dict), {})
        except TypeError:  # a destination that takes no weak reference: no sharing
            return read_weights(self.manager, slot).to(dtype)
        cached = self._tied[1].get(id(slot))
        value = cached() if cached is not None else None
        if value is None or value.dtype != dtype:
            value = read_weights(self.manager, slot).to(dtype)
            self._tied[1][id(slot)] = weakref.ref(value)
        return value

    # -- load_state_dict -----------------------------------------------------------------

    def _before_load(self, module: nn.Module, state_dict, prefix: str, local_metadata, strict, missing_keys,
                     unexpected_keys, error_msgs) -> None:
        self.before_access()
        for name, param in module._parameters.items():
            key = prefix + name
            slot = self.layout.by_param.get(id(param)) if param is not None else None
            if slot is None or key not in state_dict or not isinstance(state_dict[key], torch.Tensor):
                continue  # torch reports it
            value = state_dict[key]
            if tuple(value.shape) != tuple(slot.shape):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from "
                                  f"checkpoint, the shape in current model is {tuple(slot.shape)}.")
            else:
                write_weights(self.manager, slot, value)
            state_dict[key] = param  # torch's own copy (or assign) is now a no-op

    # -- close ---------------------------------------------------------------------------

    def weights_nbytes(self) -> int:
        return sum(s.numel * torch.empty((), dtype=self.param_dtypes[id(s)]).element_size()
                   for s in self.layout.slots)

    def check_host_room(self) -> None:
        """Raise (changing nothing) when the weights cannot be given back in host memory."""
        need = self.weights_nbytes()
        available = available_host_bytes()
        if need > available:
            raise RuntimeError(
                f"engine.close() would give the model its {format_bytes(need)} of weights as ordinary host "
                f"tensors, but only {format_bytes(available)} of host memory is available; the engine stays "
                f"open. Save them with engine.save_checkpoint(DIR) and write a weights file with "
                f"`hetmem export DIR --to model.safetensors`, then call engine.close(keep_weights=False)")

    def give_back_weights(self) -> None:
        """Parameters become CPU tensors in their original dtype; buffers go back to the host."""
        for slot in self.layout.slots:
            value = read_weights(self.manager, slot).to(self.param_dtypes[id(slot)])
            slot.param.data = value
        for module in self.model.modules():
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    dtype = self.buffer_dtypes.get((id(module), name), buffer.dtype)
                    module._buffers[name] = buffer.to("cpu", dtype)
        logger.info("the model holds its weights again (%s on the host)", format_bytes(self.weights_nbytes()))
