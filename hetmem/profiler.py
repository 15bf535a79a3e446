"""`hetmem.profile(model, batch)` (this module is hetmem.profiler): where a plain model's memory goes, before buying a GPU.

It runs one forward and backward of a copy of the model through hetmem with nothing offloaded
(the device budget holds everything), with the tracer recording each moment, and reports:

- model memory: parameters, gradients and AdamW state as plain PyTorch holds them, and as
  hetmem does (compute copy + fp32 master + moments; gradients in the parameter slots);
- non-model memory (activations) per moment, and per module: the bytes autograd saved while
  that module's forward was running (innermost module first);
- the smallest device budget hetmem needs for this model and batch: the largest moment's
  parameter chunks plus its non-model peak, with a chunk size as small as the largest module
  allows.  ``engine = hetmem.initialize(model, device_budget=result.min_device_budget,
  chunk_size=result.chunk_elements)`` trains it (a test checks exactly that);
- the smallest device budget with activation offload (``activation_offload="auto"``): the
  same, less the saved activations the plan can keep in host memory at each moment
  (hetmem/activations/policy.py ``floor_with_offload``).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from hetmem.activations import floor_with_offload, floor_without_offload
from hetmem.chunk_manager.chunk import CHUNK_ALIGN
from hetmem.chunk_manager.sizing import round_up
from hetmem.config import Config
from hetmem.engine import initialize
from hetmem.hooks import iter_tensors
from hetmem.layout import collect_parameters
from hetmem.tracer.probes import storage_key
from hetmem.units import format_bytes


@dataclass
class ProfileResult:
    parameters: int
    trainable_parameters: int
    dtype: str
    device: str
    plain_model_bytes: int           # parameters + gradients + AdamW state in plain PyTorch
    hetmem_model_bytes: int          # compute copy + fp32 master + Adam moments (hetmem)
    non_model_peak: int              # the largest activation bytes at any moment
    plain_total_bytes: int           # what plain PyTorch needs on the device: model + activations
    min_device_budget: int           # what hetmem needs on the device for this model and batch
    chunk_elements: int              # the chunk size that budget assumes
    min_device_budget_offload: int = 0  # the same with activation offload (activation_offload="auto")
    offloadable_bytes: int = 0       # saved-activation bytes that could spend time in host memory
    non_model_by_module: dict[str, int] = field(default_factory=dict)
    moments: list[dict] = field(default_factory=list)  # kind, module, chunk bytes, non-model peak

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self, top: int = 10) -> str:
        lines = [f"model: {self.parameters:,} parameters ({self.trainable_parameters:,} trainable), "
                 f"{self.dtype} on {self.device}",
                 f"plain PyTorch: model state {format_bytes(self.plain_model_bytes)} + activations "
                 f"{format_bytes(self.non_model_peak)} = {format_bytes(self.plain_total_bytes)} on the device",
                 f"hetmem: model state {format_bytes(self.hetmem_model_bytes)} in host memory (or NVMe); "
                 f"device budget needed {format_bytes(self.min_device_budget)} "
                 f"(chunk_size={self.chunk_elements:,}) = "
                 f"{self.plain_total_bytes / max(1, self.min_device_budget):.1f}x less than plain PyTorch",
                 f"with activation offload: device budget needed {format_bytes(self.min_device_budget_offload)} "
                 f"= {100 * self.min_device_budget_offload / max(1, self.min_device_budget):.0f}% of the budget "
                 f"without ({format_bytes(self.offloadable_bytes)} of saved activations can go to host memory)",
                 "", f"activations by module (top {top}):"]
        ranked = sorted(self.non_model_by_module.items(), key=lambda kv: -kv[1])[:top]
        width = max((len(name) for name, _ in ranked), default=10)
        for name, nbytes in ranked:
            lines.append(f"  {name or '<root>':{width}s}  {format_bytes(nbytes):>12s}")
        worst = max(self.moments, key=lambda m: m["chunk_bytes"] + m["non_model_peak"], default=None)
        if worst:
            lines.append(f"largest moment: {worst['kind']} {worst['module']!r}: chunks "
                         f"{format_bytes(worst['chunk_bytes'])} + activations {format_bytes(worst['non_model_peak'])}")
        return "\n".join(lines)


def _smallest_chunk(model: nn.Module) -> int:
    """A chunk that holds the largest module's own parameters, and no more."""
    _, module_slots, _ = collect_parameters(model)
    largest = max((sum(s.numel for s in slots) for slots in module_slots.values()), default=1)
    return round_up(largest, CHUNK_ALIGN)


def _call(target, batch):
    if isinstance(batch, dict):
        return target(**batch)
    if isinstance(batch, (tuple, list)):
        return target(*batch)
    return target(batch)


def _loss_of(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output if output.dim() == 0 else output.float().mean()
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is None:
        tensors = [t for t in iter_tensors(output) if t.requires_grad]
        if not tensors:
            raise ValueError("the model's output has no tensor that requires grad; give loss_fn=")
        loss = sum(t.float().mean() for t in tensors)
    return loss


def profile(model: nn.Module, batch, *, dtype: str = "bf16", device: str = "auto",
            loss_fn=None, init_fn=None) -> ProfileResult:
    """Profile one training step of ``model`` on ``batch`` (args tuple, kwargs dict or a tensor).

    The model itself is not changed: a copy is profiled.  ``loss_fn(output) -> scalar``
    picks the loss when the output is not a scalar or does not carry ``.loss``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model)
    chunk = _smallest_chunk(work)
    engine = initialize(work, Config(device=device, dtype=dtype, chunk_size=chunk, prefetch=False,
                                     memory_trace=False, gradient_clipping=None, activation_offload="auto"),
                        init_fn=init_fn)
    attribution = _Attribution(engine.module, engine.saved_tensors)
    try:
        output = _call(engine, batch)
        loss = loss_fn(output) if loss_fn is not None else _loss_of(output)
        engine.backward(loss)
        schedule = engine.tracer.store.schedule or []
        chunk_bytes = {c.id: c.nbytes for c in engine.manager.chunks}
        activations = engine.activations
        chunks, non_model = activations.moment_needs(schedule, chunk_bytes)
        moments = [{"kind": r.kind.value, "module": r.module, "chunk_bytes": c, "non_model_peak": n}
                   for r, c, n in zip(schedule, chunks, non_model)]
        # the engine's own margin rule
        min_budget = engine.accelerator.budget_for(floor_without_offload(chunks, non_model)) + 1
        min_offload = engine.accelerator.budget_for(floor_with_offload(activations.records, chunks, non_model)) + 1
        offloadable = sum(r.nbytes for r in activations.records if r.window(len(chunks)))
        params = engine.layout.numel
        trainable = engine.layout.trainable_numel
        element = 4 if dtype == "fp32" else 2
        # plain PyTorch keeps fp32 weights (autocast for bf16/fp16), fp32 gradients and AdamW state
        plain_model = params * 4 + trainable * 12
        hetmem_model = params * element + trainable * ((0 if dtype == "fp32" else 4) + 8)
        peak = engine.tracer.store.peak_non_model
        return ProfileResult(parameters=params, trainable_parameters=trainable, dtype=dtype,
                             device=str(engine.device), plain_model_bytes=plain_model,
                             hetmem_model_bytes=hetmem_model, non_model_peak=peak,
                             plain_total_bytes=plain_model + peak, min_device_budget=min_budget,
                             chunk_elements=chunk, min_device_budget_offload=min_offload,
                             offloadable_bytes=offloadable, non_model_by_module=attribution.by_module,
                             moments=moments)
    finally:
        attribution.remove()
        engine.close(keep_weights=False)  # a throw-away copy: its weights are not needed


class _Attribution:
    """Saved-activation bytes per module: the innermost module whose forward is running."""

    def __init__(self, module: nn.Module, saved_tensors):
        self.by_module: dict[str, int] = {}
        self._stack: list[str] = []
        self._seen: set[int] = set()
        names = {m: n for n, m in module.named_modules()}
        self._handles = []
        for module, name in names.items():
            self._handles.append(module.register_forward_pre_hook(self._enter(name)))
            self._handles.append(module.register_forward_hook(self._leave))
        saved_tensors.listeners.append(self._on_saved)
        self._saved_tensors = saved_tensors      # hetmem.hooks.SavedTensorHooks

    def _enter(self, name: str):
        def hook(module, args) -> None:
            self._stack.append(name)
        return hook

    def _leave(self, module, args, output) -> None:
        if self._stack:
            self._stack.pop()

    def _on_saved(self, tensor: torch.Tensor) -> None:
        key = storage_key(tensor)
        if key is None or key[0] in self._seen:
            return
        self._seen.add(key[0])
        name = self._stack[-1] if self._stack else ""
        self.by_module[name] = self.by_module.get(name, 0) + key[1]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self._on_saved in self._saved_tensors.listeners:
            self._saved_tensors.listeners.remove(self._on_saved)
