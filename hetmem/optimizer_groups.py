"""``engine.optimizer``: a ``torch.optim.Optimizer`` over the user's parameter groups.

hetmem's update runs over chunks (hetmem/optimizer.py, ``ChunkedAdam``); this class is the
face torch code sees.  Its ``param_groups`` hold the model's own ``nn.Parameter`` objects and
each group's hyperparameters as plain keys (``lr``, ``betas``, ``eps``, ``weight_decay``,
``decoupled_weight_decay``, torch's other Adam keys, and whatever a scheduler adds such as
``initial_lr``).  They are read at every step, so every ``torch.optim.lr_scheduler``,
``transformers.get_scheduler`` and a ``group["lr"] = ...`` by hand work unchanged; a key that
a group set by hand lacks takes ``engine.optimizer.defaults`` (as ``add_param_group`` fills it),
and ``None`` for ``amsgrad``/``maximize``/``differentiable`` means not set.

- ``step()`` *is* the engine's step: ``engine.step()`` calls it, and calling it directly (as
  schedulers' bookkeeping, the HF Trainer or accelerate do) runs ``engine.step()``'s logic:
  it checks that ``engine.backward`` came first and updates at accumulation boundaries only.
  Going through ``Optimizer.step`` is what makes torch's step hooks and the schedulers'
  "optimizer.step() before lr_scheduler.step()" check see every step.
- ``zero_grad()`` does nothing: gradients never stay in ``param.grad`` (they go into chunk
  memory as autograd produces them, hetmem/grads.py) and the step consumes them.
- ``state`` stays empty: Adam's moments live in chunks.  ``state_dict()`` gathers them into
  torch's layout (``state`` keyed by parameter index in group order with ``step``, ``exp_avg``,
  ``exp_avg_sq``; ``param_groups`` with ``params`` index lists), so it loads into
  ``torch.optim.AdamW`` and back; it needs the whole state in host memory.  For models whose
  state does not fit, ``engine.save_checkpoint`` is the scalable path.

The user's optimizer (``hetmem.initialize(model, config, optimizer=opt)``) must be a
``torch.optim.Adam`` or ``AdamW`` (or hetmem's ``CPUAdam``/``CPUAdamW``) over the model's
parameters; hetmem copies its groups and never steps it.  ``amsgrad``, ``maximize`` and
``differentiable`` are not implemented and raise ``ValueError``; ``foreach``, ``fused`` and
``capturable`` choose torch's implementation and are ignored (hetmem has its own).  A
parameter of the model in no group is not trained (as in torch: its gradient is computed and
dropped); a parameter not of the model raises ``ValueError``.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any, Callable

import torch

from hetmem.chunk_manager.chunk import ParamSlot
from hetmem.chunk_manager.manager import ChunkManager
from hetmem.chunk_manager.states import ChunkKind
from hetmem.config import AdamConfig
from hetmem.host_memory import available_host_bytes
from hetmem.layout import Layout
from hetmem.optim.adam import _scalar_dtype
from hetmem.optimizer import AdamHyper, ChunkedAdam, StepResult
from hetmem.state import read_slot, write_slot
from hetmem.units import format_bytes

logger = logging.getLogger("hetmem.optimizer_groups")

# torch.optim.Adam options hetmem does not implement, and the only value accepted for each
UNSUPPORTED = {"amsgrad": False, "maximize": False, "differentiable": False}
# torch implementation choices: kept in the groups (for state dicts), without effect here
IGNORED = ("foreach", "fused", "capturable")


def _accepted_classes() -> tuple[type, ...]:
    from hetmem.optim import CPUAdam, CPUAdamW

    return torch.optim.Adam, torch.optim.AdamW, CPUAdam, CPUAdamW


def config_group(adam: AdamConfig) -> dict[str, Any]:
    """The hyperparameter keys of the one group built from ``config.optimizer``."""
    group = {"lr": adam.lr, "betas": tuple(adam.betas), "eps": adam.eps, "weight_decay": adam.weight_decay,
             "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
             "fused": None, "decoupled_weight_decay": adam.decoupled}
    if not adam.bias_correction:
        group["bias_correction"] = False
    return group


def read_hyper(group: dict, where: str) -> AdamHyper:
    """A group's hyperparameters as numbers, validated; names the bad key (``where[key]``) and value."""
    for key, value in UNSUPPORTED.items():
        if group.get(key) not in (None, value):  # None: not set
            raise ValueError(f"{where}[{key!r}]={group[key]!r}: hetmem's Adam does not implement {key}; "
                             f"set it to {value}")

    def number(key: str, value, ok: Callable[[float], bool], rule: str) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            x = math.nan
        if not (math.isfinite(x) and ok(x)):
            raise ValueError(f"{where}[{key!r}]={value!r} is invalid: {rule}")
        return x

    betas = group.get("betas")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}['betas']={betas!r} is invalid: give a pair (beta1, beta2), each in [0, 1)")
    beta1, beta2 = (number("betas", b, lambda x: 0.0 <= x < 1.0, "each beta must be in [0, 1)") for b in betas)
    return AdamHyper(
        lr=number("lr", group.get("lr"), lambda x: x >= 0.0, "the learning rate must be a number >= 0"),
        beta1=beta1, beta2=beta2,
        eps=number("eps", group.get("eps"), lambda x: x > 0.0, "eps must be > 0"),
        weight_decay=number("weight_decay", group.get("weight_decay"), lambda x: x >= 0.0,
                            "weight_decay must be >= 0"),
        decoupled=bool(group.get("decoupled_weight_decay", False)),
        bias_correction=bool(group.get("bias_correction", True)))


def resolve_user_groups(optimizer, layout: Layout) -> list[tuple[dict[str, Any], list[ParamSlot]]]:
    """The user's optimizer as (hyperparameters, slots) per group; called before the model is
    materialised (a meta model's Parameters are replaced then, the slots follow them)."""
    if not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer) not in _accepted_classes():
        raise ValueError(f"optimizer={type(optimizer).__name__}: hetmem implements Adam and AdamW; give a "
                         f"torch.optim.Adam or torch.optim.AdamW built over the model's parameters (or leave "
                         f"optimizer out and set config.optimizer)")
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        hyper = {k: v for k, v in group.items() if k != "params"}
        read_hyper(hyper, f"optimizer.param_groups[{index}]")  # amsgrad, maximize, bad values: ValueError
        slots = []
        for i, param in enumerate(group["params"]):
            slot = layout.by_param.get(id(param))
            if slot is None:
                raise ValueError(f"optimizer param group {index}, parameter {i} (shape {tuple(param.shape)}, "
                                 f"{param.dtype}) is not a parameter of the model; build the optimizer over "
                                 f"model.parameters() (or groups of them)")
            slots.append(slot)
        groups.append((hyper, slots))
    return groups


class HetmemOptimizer(torch.optim.Optimizer):
    """``engine.optimizer``; see the module docstring.  Built by the engine, not by users."""

    def __init__(self, groups: list[tuple[dict[str, Any], list[ParamSlot]]], *, layout: Layout,
                 manager: ChunkManager, adam: ChunkedAdam, run_step: Callable[[], bool],
                 drop_gradients: Callable[[], None]):
        self.layout = layout          # parameter -> slot
        self.manager = manager        # reads and writes Adam's state in chunks (state dicts)
        self.adam = adam              # the chunked update; given each group's numbers before a step
        self._run_step = run_step     # the engine's step (checks, accumulation boundary, the update)
        self._drop_gradients = drop_gradients  # the engine's zero_grad: pending gradients dropped
        self.last_step_ran = False    # whether the last step() updated (False between boundaries)
        defaults = dict(groups[0][0]) if groups else {}
        super().__init__([{**hyper, "params": [s.param for s in slots]} for hyper, slots in groups], defaults)

    def add_param_group(self, param_group: dict) -> None:
        """As torch's, for parameters of the model only (e.g. ones left out at initialize)."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for i, param in enumerate(params):
            if id(param) not in self.layout.by_param:
                raise ValueError(f"add_param_group: parameter {i} (shape {tuple(param.shape)}) is not a parameter "
                                 f"of the model hetmem trains")
        read_hyper({**self.defaults, **param_group}, f"add_param_group: param_groups[{len(self.param_groups)}]")
        super().add_param_group(param_group)

    # -- the step ------------------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None):
        """``engine.step()``: the update at accumulation boundaries.  ``closure`` (optional)
        runs first with gradients enabled and must call ``engine(...)`` and ``engine.backward``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_step_ran = self._run_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``engine.zero_grad()``: drop the gradients pending since the last step, as torch's
        drops ``param.grad`` (after a step there are none, so the usual call there is free)."""
        self._drop_gradients()

    def run_update(self) -> StepResult | None:
        """Read every group's parameters and hyperparameters now, then run the chunked update
        (the engine calls this at a boundary); None while the update is pending (overlapped:
        the next forward applies it with the hyperparameters read here).  A step an IO error
        interrupted resumes with the hyperparameters it started with."""
        if self.adam.pending is None:
            self.adam.hyper, self.adam.group_of = self.read_groups()
        return self.adam.step()

    def read_groups(self) -> tuple[list[AdamHyper], dict[int, int]]:
        """Every param group's hyperparameters and id(slot) -> group index, as they are now."""
        # a key a group lacks (groups replaced by hand) takes the default, as add_param_group fills it
        hyper = [read_hyper({**self.defaults, **group}, f"engine.optimizer.param_groups[{i}]")
                 for i, group in enumerate(self.param_groups)]
        return hyper, self._group_of()

    def _group_of(self) -> dict[int, int]:
        """id(slot) -> group index, for trainable slots (frozen ones have no Adam state)."""
        group_of: dict[int, int] = {}
        for index, group in enumerate(self.param_groups):
            for param in group["params"]:
                slot = self._slot(param, index)
                if id(slot) in group_of:
                    raise ValueError(f"parameter {slot.name!r} is in param groups {group_of[id(slot)]} and "
                                     f"{index}; a parameter belongs to one group")
                if slot.trainable:
                    group_of[id(slot)] = index
        return group_of

    def _slot(self, param, index: int) -> ParamSlot:
        slot = self.layout.by_param.get(id(param))
        if slot is None:
            raise ValueError(f"engine.optimizer.param_groups[{index}] holds a tensor of shape {tuple(param.shape)} "
                             f"that is not a parameter of the model")
        return slot

    # -- state dicts ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.AdamW's state dict, gathered from the chunks into host memory."""
        self.adam.finish_pending()
        unowned = [g.index for g in self.layout.groups if g.trainable and ChunkKind.EXP_AVG not in g.chunks]
        if unowned:
            raise RuntimeError(f"engine.optimizer.state_dict() under data parallelism: this rank holds Adam's state "
                               f"of its own chunk groups only (not of groups {unowned[:8]}); use "
                               f"engine.save_checkpoint(DIR) on every rank, which saves every rank's share by "
                               f"parameter name and loads at any world size")
        need = sum(2 * 4 * s.numel for s in self.layout.slots if s.trainable and s.step > 0)
        if need > available_host_bytes():
            raise RuntimeError(f"engine.optimizer.state_dict() gathers Adam's state ({format_bytes(need)}) into host "
                               f"memory, but only {format_bytes(available_host_bytes())} is available; use "
                               f"engine.save_checkpoint(DIR), which streams it chunk by chunk")
        gathered = defaultdict(dict)
        for index, group in enumerate(self.param_groups):
            for param in group["params"]:
                slot = self._slot(param, index)
                if slot.trainable and slot.step > 0:
                    gathered[param] = {"step": torch.tensor(float(slot.step), dtype=_scalar_dtype()),
                                       "exp_avg": read_slot(self.manager, slot, ChunkKind.EXP_AVG),
                                       "exp_avg_sq": read_slot(self.manager, slot, ChunkKind.EXP_AVG_SQ)}
        self.state = gathered
        try:
            return super().state_dict()
        finally:
            self.state = defaultdict(dict)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from this class or from torch.optim.Adam/AdamW over the same groups.
        Everything is checked before anything changes."""
        self.adam.finish_pending()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            changed = hook(self, state_dict)
            if changed is not None:
                state_dict = changed
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the loaded state dict has {len(saved_groups)} param groups, engine.optimizer "
                             f"has {len(self.param_groups)}")
        index_to_slot: dict[Any, ParamSlot] = {}
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {index} of the loaded state dict has {len(saved['params'])} "
                                 f"parameters, engine.optimizer's has {len(group['params'])}")
            read_hyper(saved, f"the loaded state dict's param_groups[{index}]")
            for saved_id, param in zip(saved["params"], group["params"]):
                index_to_slot[saved_id] = self._slot(param, index)
        updates: dict[int, tuple[ParamSlot, int, torch.Tensor, torch.Tensor]] = {}
        for saved_id, entry in state_dict["state"].items():
            slot = index_to_slot.get(saved_id)
            if slot is None:
                raise ValueError(f"the loaded state dict has state for parameter {saved_id!r}, which no param "
                                 f"group lists")
            missing = {"step", "exp_avg", "exp_avg_sq"} - set(entry)
            if missing or "max_exp_avg_sq" in entry:
                raise ValueError(f"state of parameter {saved_id} ({slot.name}) must hold step, exp_avg and "
                                 f"exp_avg_sq (Adam without amsgrad); found {sorted(entry)}")
            for key in ("exp_avg", "exp_avg_sq"):
                if entry[key].numel() != slot.numel:
                    raise ValueError(f"state[{saved_id}][{key!r}] ({slot.name}) has shape {tuple(entry[key].shape)}, "
                                     f"the parameter {tuple(slot.shape)}")
            step = float(entry["step"])
            if step < 0 or step != int(step):
                raise ValueError(f"state[{saved_id}]['step']={step} ({slot.name}) must be a whole number >= 0")
            if not slot.trainable:
                logger.warning("optimizer state for %s is ignored: the parameter is frozen in hetmem", slot.name)
                continue
            updates[id(slot)] = (slot, int(step), entry["exp_avg"], entry["exp_avg_sq"])
        for slot in index_to_slot.values():
            if not slot.trainable:
                continue
            _, step, exp_avg, exp_avg_sq = updates.get(id(slot), (slot, 0, None, None))
            for kind, value in ((ChunkKind.EXP_AVG, exp_avg), (ChunkKind.EXP_AVG_SQ, exp_avg_sq)):
                if kind not in slot.group.chunks:  # data parallel: another rank owns this group's state
                    continue
                write_slot(self.manager, slot, kind, torch.zeros(slot.numel) if value is None else value)
            slot.step = step
        self.param_groups = [{**{k: v for k, v in saved.items() if k != "params"}, "params": group["params"]}
                             for saved, group in zip(saved_groups, self.param_groups)]
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
