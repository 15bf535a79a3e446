"""The CPU Adam/AdamW step: tensor validation, dispatch to the ``cpu_adam`` C++ op, fallback.

``adam_step`` updates one flat range of parameters in place with exactly the semantics of
``torch.optim.Adam`` (``decoupled=False``: L2 weight decay folded into the gradient) or
``torch.optim.AdamW`` (``decoupled=True``), reading fp32, fp16 or bf16 gradients, dividing
them by ``grad_scale``, and optionally writing the new parameters as fp16/bf16 into ``out``
in the same pass (round to nearest even: ``out`` equals ``param.to(out.dtype)``).  The
engine calls it once per chunk; ``hetmem.optim.CPUAdam`` once per parameter.

The op picks its SIMD path at run time (``simd_level()``: "avx512", "avx2" or "scalar"),
``HETMEM_ADAM_SIMD=scalar|avx2|avx512`` caps it when the op loads, and
``set_simd_level()`` changes it later.  It runs on ``get_num_threads()`` threads (default:
the cores this process may use).  When the op cannot be built, a pure-PyTorch
implementation with the same semantics runs instead (torch's fused CPU Adam when it
applies) and one warning says why.
"""
from __future__ import annotations

import logging
import math
import os
import threading

import torch

from .builder import OpBuildError, builder, check_fallback_allowed

logger = logging.getLogger("hetmem.ops.adam")

SIMD_LEVELS = ("scalar", "avx2", "avx512")   # in increasing order
FALLBACK_LEVEL = "fallback (pure PyTorch)"    # what simd_level() says without the op
SIMD_ENV = "HETMEM_ADAM_SIMD"

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_UNLOADED = object()


class _OpState:
    """The loaded op (or None after a failed build); one per process, replaced by _reset()."""

    def __init__(self) -> None:
        self.lock = threading.Lock()     # guards the first load
        self.module = _UNLOADED          # the extension module, None (fallback), or _UNLOADED
        self.reason: str | None = None   # why the op is unavailable, once known


_STATE = _OpState()


def _op():
    """The cpu_adam extension module, or None when it cannot be built (logged once)."""
    module = _STATE.module
    if module is not _UNLOADED:
        return module
    with _STATE.lock:
        if _STATE.module is not _UNLOADED:
            return _STATE.module
        try:
            module = builder("cpu_adam").load()
        except OpBuildError as exc:
            check_fallback_allowed(builder("cpu_adam"), exc)
            _STATE.reason = str(exc)
            logger.warning("CPU Adam: the C++ op is unavailable (%s); using the slower pure-PyTorch "
                           "fallback", exc)
            module = None
        else:
            cap = os.environ.get(SIMD_ENV)
            if cap:
                if cap not in SIMD_LEVELS:
                    raise ValueError(f"{SIMD_ENV}={cap!r} is not a SIMD level; use one of "
                                     f"{', '.join(SIMD_LEVELS)} or unset it")
                if SIMD_LEVELS.index(cap) < SIMD_LEVELS.index(module.simd_level()):
                    module.set_simd_level(cap)
            logger.info("CPU Adam: %s path, %d threads", module.simd_level(), module.num_threads())
        _STATE.module = module
        return module


def _reset() -> None:
    """Forget the loaded op so the next call loads it again (tests of the fallback)."""
    global _STATE
    _STATE = _OpState()


# -- configuration -------------------------------------------------------------------------

def is_available() -> bool:
    """True when the C++ op is (or can be) loaded; builds it on first call."""
    return _op() is not None


def unavailable_reason() -> str | None:
    """Why the fallback runs (None when the op is loaded); builds the op on first call."""
    _op()
    return _STATE.reason


def simd_level() -> str:
    """The path adam_step uses: "avx512", "avx2", "scalar", or FALLBACK_LEVEL."""
    op = _op()
    return FALLBACK_LEVEL if op is None else op.simd_level()


def available_simd_levels() -> tuple[str, ...]:
    """Every level this CPU can run (all of them can be selected with set_simd_level)."""
    op = _op()
    if op is None:
        return ()
    return SIMD_LEVELS[: SIMD_LEVELS.index(op.max_simd_level()) + 1]


def set_simd_level(level: str) -> str:
    """Use this SIMD path from now on (capped at what the CPU has); returns the path in use."""
    if level not in SIMD_LEVELS:
        raise ValueError(f"set_simd_level: level must be one of {', '.join(SIMD_LEVELS)}, found {level!r}")
    op = _op()
    return FALLBACK_LEVEL if op is None else op.set_simd_level(level)


def set_num_threads(threads: int) -> None:
    """Threads per adam_step call, counting the caller (default: the usable cores).

    The fallback runs on torch's intra-op threads instead (``torch.set_num_threads``);
    this function does not change those.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"set_num_threads: threads must be an int >= 1, found {threads!r}")
    op = _op()
    if op is None:
        logger.info("CPU Adam fallback runs on torch's %d intra-op threads; set_num_threads(%d) has no effect",
                    torch.get_num_threads(), threads)
    else:
        op.set_num_threads(threads)


def get_num_threads() -> int:
    """Threads per adam_step call (torch's intra-op threads for the fallback)."""
    op = _op()
    return torch.get_num_threads() if op is None else op.num_threads()


def set_serial_threshold(elements: int) -> None:
    """Calls with fewer elements run on the calling thread only (waking the pool costs more).

    Default 2**17.  The threads share a call in blocks of 2**16 elements, so calls of fewer
    than 2 blocks always run on the calling thread.
    """
    if isinstance(elements, bool) or not isinstance(elements, int) or elements < 0:
        raise ValueError(f"set_serial_threshold: elements must be an int >= 0, found {elements!r}")
    op = _op()
    if op is not None:
        op.set_serial_threshold(elements)


def get_serial_threshold() -> int:
    op = _op()
    return 0 if op is None else op.serial_threshold()


# -- validation ----------------------------------------------------------------------------

def _dtype_list(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _check_tensor(name: str, t, dtypes, numel: int | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"adam_step: {name} must be a torch.Tensor, found {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"adam_step: {name} must be on the CPU, found it on {t.device}")
    if t.layout != torch.strided:
        raise ValueError(f"adam_step: {name} must be a dense (strided) tensor, found layout {t.layout}")
    if t.dtype not in dtypes:
        raise ValueError(f"adam_step: {name} must have dtype {_dtype_list(dtypes)}, found {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"adam_step: {name} must be contiguous, found shape {tuple(t.shape)} with strides "
                         f"{t.stride()}; hetmem never copies silently: pass a contiguous tensor")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"adam_step: {name} has {t.numel()} elements, expected {numel} (as param)")


def _check_number(name: str, value, low: float, high: float | None = None, *, low_open: bool = False) -> float:
    """A finite real in [low, high) (or (low, ...) when low_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"adam_step: {name} must be a number, found {type(value).__name__} {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = high is not None and value >= high
    if not math.isfinite(value) or too_low or too_high:
        interval = f"{'(' if low_open else '['}{low:g}, {'1)' if high is not None else 'inf)'}"
        raise ValueError(f"adam_step: {name} must be a finite number in {interval}, found {value!r}")
    return value


def _check_overlap(tensors: dict[str, torch.Tensor | None]) -> None:
    """No two tensors may share memory, except grad and out when they are exactly the same."""
    spans = []
    for name, t in tensors.items():
        if t is not None and t.numel() > 0:
            start = t.data_ptr()
            spans.append((name, t, start, start + t.numel() * t.element_size()))
    for i, (name_a, a, start_a, end_a) in enumerate(spans):
        for name_b, b, start_b, end_b in spans[i + 1:]:
            if start_a >= end_b or start_b >= end_a:
                continue
            if ({name_a, name_b} == {"grad", "out"} and start_a == start_b and a.numel() == b.numel()
                    and a.dtype == b.dtype and a.dtype in _LOW_PRECISION):
                continue  # the engine's layout: the new parameter overwrites its gradient
            raise ValueError(
                f"adam_step: {name_a} and {name_b} overlap in memory ({name_a} at 0x{start_a:x}..0x{end_a:x}, "
                f"{name_b} at 0x{start_b:x}..0x{end_b:x}); only grad and out may share memory, and only "
                f"exactly (same data_ptr, numel and 16-bit dtype)")


def _check_operands(param, grad, exp_avg, exp_avg_sq, out) -> int:
    """Device, dtype, layout and size of adam_step's tensors; returns the element count."""
    _check_tensor("param", param, (torch.float32,), None)
    n = param.numel()
    _check_tensor("grad", grad, (torch.float32, *_LOW_PRECISION), n)
    _check_tensor("exp_avg", exp_avg, (torch.float32,), n)
    _check_tensor("exp_avg_sq", exp_avg_sq, (torch.float32,), n)
    if out is not None:
        _check_tensor("out", out, _LOW_PRECISION, n)
    return n


def _check_step(step) -> int:
    integral = (isinstance(step, int) and not isinstance(step, bool)) or (
        isinstance(step, float) and step.is_integer())
    if not integral or step < 1:
        raise ValueError(f"adam_step: step must be an int >= 1 (the count including this update), "
                         f"found {step!r}")
    return int(step)


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"adam_step: {name} must be a bool, found {type(value).__name__} {value!r}")
    return value


# -- the step ------------------------------------------------------------------------------

def adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
              step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
              decoupled: bool, grad_scale: float = 1.0, out: torch.Tensor | None = None,
              bias_correction: bool = True) -> None:
    """One Adam (``decoupled=False``) or AdamW (``decoupled=True``) step, in place.

    Args:
        param, exp_avg, exp_avg_sq: contiguous fp32 CPU tensors, updated in place.
        grad: contiguous CPU tensor (fp32, fp16 or bf16) with as many elements; divided by
            ``grad_scale`` before use and never modified (unless it is ``out``).
        step: this update's 1-based step count (torch's ``state["step"]`` after its increment).
        lr, beta1, beta2, eps, weight_decay: as ``torch.optim.Adam``/``AdamW``.
        grad_scale: > 0; loss scale / clip coefficient.  1.0 is exactly no scaling.
        out: None, or a contiguous fp16/bf16 CPU tensor that receives the new ``param``
            rounded to nearest even.  It may be the very same memory as ``grad``.
        bias_correction: as torch (True); False uses step_size = lr and no sqrt correction.

    Tensors may have any shapes with equal numel.  Raises ValueError naming the argument
    for a bad tensor (device, dtype, layout, contiguity, size, overlap) or a bad value.
    """
    n = _check_operands(param, grad, exp_avg, exp_avg_sq, out)
    step = _check_step(step)
    lr = _check_number("lr", lr, 0.0)
    beta1 = _check_number("beta1", beta1, 0.0, 1.0)
    beta2 = _check_number("beta2", beta2, 0.0, 1.0)
    eps = _check_number("eps", eps, 0.0)
    weight_decay = _check_number("weight_decay", weight_decay, 0.0)
    grad_scale = _check_number("grad_scale", grad_scale, 0.0, low_open=True)
    decoupled = _check_flag("decoupled", decoupled)
    bias_correction = _check_flag("bias_correction", bias_correction)
    _check_overlap({"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "out": out})
    if n == 0:
        return

    op = _op()
    if op is None:
        _fallback_step(param, grad, exp_avg, exp_avg_sq, out, step=step, lr=lr, beta1=beta1, beta2=beta2,
                       eps=eps, weight_decay=weight_decay, decoupled=decoupled,
                       bias_correction=bias_correction, grad_scale=grad_scale)
        return
    op.adam_step(param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                 0 if out is None else out.data_ptr(), n, _DTYPE_NAMES[grad.dtype],
                 "bfloat16" if out is None else _DTYPE_NAMES[out.dtype], step, lr, beta1, beta2, eps,
                 weight_decay, decoupled, bias_correction, grad_scale)
    # The op wrote through raw pointers; tell autograd, as an in-place torch op would.
    _bump_versions(param, exp_avg, exp_avg_sq, out)


def _bump_versions(*tensors: torch.Tensor | None) -> None:
    written = [t for t in tensors if t is not None and not t.is_inference()]
    if written:
        torch.autograd.graph.increment_version(written)


def stream_probe(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 out: torch.Tensor | None = None, *, prefetch: bool = True, streaming_stores: bool = False,
                 static_split: bool = False) -> None:
    """Adam's memory traffic with trivial math, on the same threads: the roofline.

    Reads param, exp_avg, exp_avg_sq (fp32) and grad, writes param, exp_avg, exp_avg_sq and
    out (if given): 28 bytes per element for fp32 grads without out, and for 16-bit grad
    and out.  It adds g to param and exp_avg, g*g to exp_avg_sq, and writes param's upper
    16 bits to out, so the arrays stay usable.  With the defaults it moves them as
    adam_step does (same loads, stores, software prefetch and thread split); the options
    change one thing each, so that a benchmark can take the fastest way it finds:

        prefetch=False          no software prefetch (the hardware prefetchers only)
        streaming_stores=True   param, exp_avg and exp_avg_sq stored around the cache
        static_split=True       one contiguous range per thread, none taken from another

    Needs the C++ op (raises OpBuildError without it).
    """
    n = _check_operands(param, grad, exp_avg, exp_avg_sq, out)
    _check_overlap({"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "out": out})
    options = {name: _check_flag(name, value) for name, value in
               (("prefetch", prefetch), ("streaming_stores", streaming_stores), ("static_split", static_split))}
    op = _op()
    if op is None:
        raise OpBuildError(f"stream_probe needs the cpu_adam op: {_STATE.reason}")
    op.stream_probe(param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                    0 if out is None else out.data_ptr(), n, _DTYPE_NAMES[grad.dtype],
                    "bfloat16" if out is None else _DTYPE_NAMES[out.dtype], **options)


# -- gradient norms ------------------------------------------------------------------------

def squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of the squares of ``tensor``'s elements (its squared L2 norm), a 0-d fp32
    tensor on its device.

    A dense fp16 or bf16 CPU tensor goes through the op's ``sum_squares``: summed in float64
    in one pass without a temporary (a non-contiguous tensor is copied first, so layout never
    changes the bits), the same bits on every SIMD path, rounded once to fp32.  torch's
    ``vector_norm(t, dtype=float32)`` first copies such a tensor to fp32 whole (16 MiB for a
    1024 x 4096 weight); inside training it took 6x as long (``benchmarks/grad_norm.py``).
    Everything else (fp32, whose norm torch takes without a copy and on two threads, faster
    than this op's one; an accelerator's tensor; no op) takes torch's
    ``vector_norm(t, dtype=float32).square()``.  The result is fp32 on both paths, so a sum
    past fp32's range is infinite on both (the non-finite check skips such a step, as it
    skips a NaN or an infinite gradient).
    """
    if tensor.device.type == "cpu" and tensor.layout == torch.strided and tensor.dtype in _LOW_PRECISION:
        op = _op()
        if op is not None:
            flat = tensor if tensor.is_contiguous() else tensor.contiguous()
            return torch.tensor(op.sum_squares(flat.data_ptr(), flat.numel(), _DTYPE_NAMES[flat.dtype]),
                                dtype=torch.float32)
    if tensor.dtype not in _DTYPE_NAMES:  # vector_norm's dtype may only widen
        tensor = tensor.float()
    return torch.linalg.vector_norm(tensor, dtype=torch.float32).square()


# -- fallback ------------------------------------------------------------------------------

def torch_adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                    step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                    decoupled: bool, grad_scale: float = 1.0, out: torch.Tensor | None = None,
                    bias_correction: bool = True) -> None:
    """adam_step's semantics in torch ops, for tensors on any device (the engine updates chunk
    groups that live on a GPU with it).  Same arguments and the same aliasing rule for grad/out."""
    n = param.numel()
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("out", out)):
        if t is not None and (t.numel() != n or t.device != param.device or not t.is_contiguous()):
            raise ValueError(f"torch_adam_step: {name} must be contiguous with {n} elements on {param.device}, "
                             f"found {t.numel()} on {t.device}")
    _fallback_step(param, grad, exp_avg, exp_avg_sq, out, step=_check_step(step), lr=lr, beta1=beta1,
                   beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
                   bias_correction=bias_correction, grad_scale=grad_scale)


# torch's fused CPU Adam kernels (private API, present since torch 2.4); None without them.
_FUSED = ((torch._fused_adam_, torch._fused_adamw_)
          if hasattr(torch, "_fused_adam_") and hasattr(torch, "_fused_adamw_") else None)


@torch.no_grad()
def _fallback_step(param, grad, exp_avg, exp_avg_sq, out, *, step, lr, beta1, beta2, eps, weight_decay,
                   decoupled, bias_correction, grad_scale) -> None:
    """adam_step in PyTorch ops: torch's fused CPU Adam when it applies, else its single-tensor math."""
    p, m, v = param.view(-1), exp_avg.view(-1), exp_avg_sq.view(-1)
    g = grad.view(-1)
    if g.dtype != torch.float32:
        g = g.float()           # a copy: grad may be out, which is written below
    if grad_scale != 1.0:
        g = g / grad_scale
    if _FUSED is not None and bias_correction and p.device.type == "cpu":
        fused = _FUSED[1] if decoupled else _FUSED[0]
        fused([p], [g], [m], [v], [], [torch.tensor(float(step))], amsgrad=False, lr=lr, beta1=beta1,
              beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=False)
    else:  # torch.optim.Adam's single-tensor path, op for op
        if weight_decay != 0:
            if decoupled:
                p.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step if bias_correction else 1.0
        bias_correction2 = 1 - beta2 ** step if bias_correction else 1.0
        denom = (v.sqrt() / bias_correction2 ** 0.5).add_(eps)
        p.addcdiv_(m, denom, value=-(lr / bias_correction1))
    if out is not None:
        out.view(-1).copy_(p)
