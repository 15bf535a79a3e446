"""``CPUAdam`` / ``CPUAdamW``: ``torch.optim.Adam`` / ``AdamW`` for fp32 CPU parameters on
hetmem's SIMD kernel (``hetmem.ops.adam.adam_step``).

The same update, element for element (within fp32 rounding), the same state
(``state[p]`` holds ``step`` as a float32 scalar tensor, ``exp_avg``, ``exp_avg_sq``), and
param groups with torch's keys, so a ``state_dict()`` saved by one loads into the other and
training continues the same.  torch options that hetmem does not implement (amsgrad,
maximize, capturable, differentiable) must keep their defaults; a loaded state dict that
sets one raises ``ValueError``.  ``foreach`` and ``fused`` are kept for torch's sake and
ignored here.
"""
from __future__ import annotations

import logging

import torch

from hetmem.ops.adam import adam_step

logger = logging.getLogger("hetmem.optim.adam")

# torch.optim.Adam options and the only value CPUAdam accepts for each.
_FIXED_OPTIONS = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False}
_GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _scalar_dtype() -> torch.dtype:
    # what torch.optim uses for state["step"] (torch.optim.optimizer._get_scalar_dtype)
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _check_hyperparameters(name: str, lr, betas, eps, weight_decay) -> None:
    if not 0.0 <= float(lr):
        raise ValueError(f"{name}: lr must be >= 0, found {lr!r}")
    if not 0.0 <= eps:
        raise ValueError(f"{name}: eps must be >= 0, found {eps!r}")
    if len(betas) != 2:
        raise ValueError(f"{name}: betas must be a pair (beta1, beta2), found {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"{name}: betas[{i}] must be in [0, 1), found {beta!r}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"{name}: weight_decay must be >= 0, found {weight_decay!r}")


class CPUAdam(torch.optim.Optimizer):
    """Adam (L2 weight decay added to the gradient) on hetmem's CPU kernel.

    Args:
        params: fp32, contiguous CPU parameters, or param-group dicts (as for torch).
        lr, betas, eps, weight_decay: as ``torch.optim.Adam``.
        bias_correction: divide by (1 - beta^step) as torch does (default); False skips it.

    Gradients may be fp32, fp16 or bf16 (read as they are, no copy).  Parameters whose
    ``grad`` is None are skipped.  Threads: ``hetmem.ops.adam.set_num_threads``.
    """

    _decoupled = False  # the decoupled_weight_decay of new groups: AdamW semantics when True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, bias_correction: bool = True) -> None:
        _check_hyperparameters(type(self).__name__, lr, betas, eps, weight_decay)
        defaults = {
            "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
            **_FIXED_OPTIONS, "foreach": None, "fused": None,
            "decoupled_weight_decay": self._decoupled, "bias_correction": bias_correction,
        }
        super().__init__(params, defaults)

    # -- groups and state dicts ------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        where = f"param group {index}"
        _check_hyperparameters(f"{type(self).__name__} {where}", group["lr"], group["betas"], group["eps"],
                               group["weight_decay"])
        self._check_options(group, where)
        for i, p in enumerate(group["params"]):
            if p.device.type != "cpu" or p.dtype != torch.float32:
                raise ValueError(f"{type(self).__name__}: parameter {i} of {where} must be an fp32 CPU tensor, "
                                 f"found {p.dtype} on {p.device}; use torch.optim.Adam for other parameters")
            if not p.is_contiguous():
                raise ValueError(f"{type(self).__name__}: parameter {i} of {where} (shape {tuple(p.shape)}) "
                                 f"must be contiguous, found strides {p.stride()}; convert the model with "
                                 f"`.to(memory_format=torch.contiguous_format)`")

    def _check_options(self, group: dict, where: str) -> None:
        for key, value in _FIXED_OPTIONS.items():
            if group.get(key, value) != value:
                raise ValueError(f"{type(self).__name__}: {where} sets {key}={group[key]!r}, which hetmem's CPU "
                                 f"Adam does not implement (only {key}={value}); use torch.optim.Adam for it")

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by this class, by torch.optim.Adam or by AdamW."""
        for index, group in enumerate(state_dict.get("param_groups", [])):
            self._check_options(group, f"param group {index} of the loaded state dict")
        super().load_state_dict(state_dict)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # torch's defaults for keys an older dict may lack
            for key, value in _FIXED_OPTIONS.items():
                group.setdefault(key, value)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("bias_correction", True)
            for p in group["params"]:  # as torch.optim.Adam: a numeric step becomes a tensor
                p_state = self.state.get(p)
                if p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=_scalar_dtype())

    # -- the step --------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        name = type(self).__name__
        for index, group in enumerate(self.param_groups):
            self._check_options(group, f"param group {index}")
            beta1, beta2 = (float(b) for b in group["betas"])
            lr, eps, weight_decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
            for i, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                if grad.layout != torch.strided or grad.dtype not in _GRAD_DTYPES or grad.device != p.device \
                        or grad.shape != p.shape or not grad.is_contiguous():
                    raise ValueError(
                        f"{name}: the gradient of parameter {i} in param group {index} must be a dense, contiguous "
                        f"CPU tensor of shape {tuple(p.shape)} and dtype float32, float16 or bfloat16; found "
                        f"{grad.layout} {grad.dtype} on {grad.device}, shape {tuple(grad.shape)}, strides "
                        f"{grad.stride() if grad.layout == torch.strided else None}")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                step_t = state["step"]
                step_t += 1
                adam_step(p, grad, state["exp_avg"], state["exp_avg_sq"], step=int(step_t.item()), lr=lr, beta1=beta1,
                          beta2=beta2, eps=eps, weight_decay=weight_decay,
                          decoupled=bool(group["decoupled_weight_decay"]),
                          bias_correction=bool(group["bias_correction"]))
        return loss


class CPUAdamW(CPUAdam):
    """AdamW (decoupled weight decay, default 1e-2) on hetmem's CPU kernel; see CPUAdam.

    Like torch.optim.AdamW, every group uses decoupled weight decay, also after loading a
    state dict saved by Adam.
    """

    _decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, bias_correction: bool = True) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, bias_correction=bias_correction)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
