"""adam_step rejects every bad input with a ValueError naming the argument, what was
expected and what was found, before anything is written."""
from __future__ import annotations

import pytest
import torch

from hetmem.ops import adam

N = 12
HYPER = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False)


def tensors(n: int = N):
    return dict(param=torch.randn(n), grad=torch.randn(n), exp_avg=torch.zeros(n), exp_avg_sq=torch.zeros(n))


def call(**overrides):
    args = {**tensors(), **HYPER, **overrides}
    param, grad, exp_avg, exp_avg_sq = (args.pop(k) for k in ("param", "grad", "exp_avg", "exp_avg_sq"))
    adam.adam_step(param, grad, exp_avg, exp_avg_sq, **args)


@pytest.mark.parametrize("overrides,pattern", [
    (dict(param=[1.0] * N), r"param must be a torch\.Tensor, found list"),
    (dict(param=torch.randn(N, dtype=torch.float64)), r"param must have dtype float32, found torch\.float64"),
    (dict(param=torch.randn(N).to(torch.bfloat16)), r"param must have dtype float32, found torch\.bfloat16"),
    (dict(param=torch.empty(N, device="meta")), r"param must be on the CPU, found it on meta"),
    (dict(grad=torch.randn(N).to(torch.float64)),
     r"grad must have dtype float32, float16 or bfloat16, found torch\.float64"),
    (dict(grad=torch.randn(N).to_sparse()), r"grad must be a dense \(strided\) tensor, found layout torch\.sparse_coo"),
    (dict(grad=torch.randn(4, 3).t()), r"grad must be contiguous, found shape \(3, 4\) with strides \(1, 3\)"),
    (dict(exp_avg=torch.zeros(2 * N)[::2]), r"exp_avg must be contiguous, found shape \(12,\) with strides \(2,\)"),
    (dict(exp_avg=torch.zeros(N - 1)), r"exp_avg has 11 elements, expected 12 \(as param\)"),
    (dict(exp_avg_sq=torch.zeros(N + 1)), r"exp_avg_sq has 13 elements, expected 12"),
    (dict(exp_avg_sq=torch.zeros(N, dtype=torch.float16)), r"exp_avg_sq must have dtype float32, found torch\.float16"),
    (dict(out=torch.empty(N)), r"out must have dtype float16 or bfloat16, found torch\.float32"),
    (dict(out=torch.empty(N - 2, dtype=torch.bfloat16)), r"out has 10 elements, expected 12"),
    (dict(step=0), r"step must be an int >= 1 \(the count including this update\), found 0"),
    (dict(step=1.5), r"step must be an int >= 1 .*found 1\.5"),
    (dict(step=True), r"step must be an int >= 1 .*found True"),
    (dict(lr=-1e-3), r"lr must be a finite number in \[0, inf\), found -0\.001"),
    (dict(lr=float("nan")), r"lr must be a finite number in \[0, inf\), found nan"),
    (dict(lr="0.1"), r"lr must be a number, found str '0\.1'"),
    (dict(beta1=1.0), r"beta1 must be a finite number in \[0, 1\), found 1\.0"),
    (dict(beta2=-0.1), r"beta2 must be a finite number in \[0, 1\), found -0\.1"),
    (dict(eps=-1e-8), r"eps must be a finite number in \[0, inf\), found -1e-08"),
    (dict(weight_decay=float("inf")), r"weight_decay must be a finite number in \[0, inf\), found inf"),
    (dict(grad_scale=0.0), r"grad_scale must be a finite number in \(0, inf\), found 0\.0"),
    (dict(grad_scale=float("inf")), r"grad_scale must be a finite number in \(0, inf\), found inf"),
    (dict(decoupled=1), r"decoupled must be a bool, found int 1"),
    (dict(bias_correction=None), r"bias_correction must be a bool, found NoneType None"),
])
def test_bad_argument_named(overrides, pattern):
    with pytest.raises(ValueError, match="adam_step: " + pattern):
        call(**overrides)


def test_nothing_is_written_when_rejected():
    t = tensors()
    before = {k: v.clone() for k, v in t.items()}
    with pytest.raises(ValueError):
        adam.adam_step(t["param"], t["grad"], t["exp_avg"], t["exp_avg_sq"], **{**HYPER, "lr": -1.0})
    for k in t:
        assert torch.equal(t[k], before[k]), k


def test_overlapping_tensors_named():
    t = tensors()
    with pytest.raises(ValueError, match=r"adam_step: param and exp_avg overlap in memory"):
        adam.adam_step(t["param"], t["grad"], t["param"], t["exp_avg_sq"], **HYPER)
    buf = torch.zeros(2 * N)
    with pytest.raises(ValueError, match=r"adam_step: exp_avg and exp_avg_sq overlap in memory"):
        adam.adam_step(t["param"], t["grad"], buf[:N], buf[N // 2:N // 2 + N], **HYPER)
    # grad and out may share memory only exactly: same start, numel and 16-bit dtype
    slot = torch.zeros(N + 1, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"adam_step: grad and out overlap in memory .* only grad and out may share"):
        adam.adam_step(t["param"], slot[:N], t["exp_avg"], t["exp_avg_sq"], out=slot[1:], **HYPER)
    g16 = torch.zeros(N, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"adam_step: grad and out overlap"):
        adam.adam_step(t["param"], g16, t["exp_avg"], t["exp_avg_sq"], out=g16.view(torch.bfloat16), **HYPER)
    g32 = torch.zeros(N)
    with pytest.raises(ValueError, match=r"adam_step: grad and out overlap"):
        adam.adam_step(t["param"], g32, t["exp_avg"], t["exp_avg_sq"], out=g32.view(torch.bfloat16)[:N], **HYPER)
    with pytest.raises(ValueError, match=r"adam_step: param and out overlap"):
        adam.adam_step(t["param"], t["grad"], t["exp_avg"], t["exp_avg_sq"],
                       out=t["param"].view(torch.bfloat16)[:N], **HYPER)


def test_exact_grad_out_alias_and_empty_tensors_are_accepted():
    t = tensors()
    slot = torch.randn(N).to(torch.bfloat16)
    adam.adam_step(t["param"], slot, t["exp_avg"], t["exp_avg_sq"], out=slot, **HYPER)
    assert torch.equal(slot, t["param"].to(torch.bfloat16))
    e = tensors(0)
    adam.adam_step(e["param"], e["grad"], e["exp_avg"], e["exp_avg_sq"], out=torch.empty(0, dtype=torch.float16),
                   **HYPER)


def test_any_shapes_with_equal_numel():
    t = tensors()
    flat = t["param"].clone()
    adam.adam_step(flat, t["grad"], torch.zeros(N), torch.zeros(N), **HYPER)
    shaped = t["param"].view(3, 4)
    adam.adam_step(shaped, t["grad"].view(2, 6), t["exp_avg"].view(12, 1), t["exp_avg_sq"], **HYPER)
    assert torch.equal(shaped.reshape(-1), flat)


def test_autograd_sees_the_in_place_update():
    # The kernel writes through raw pointers; autograd must still notice, as for param.add_().
    w = torch.randn(N, requires_grad=True)
    y = (w * w).sum()  # saves w for backward
    with torch.no_grad():
        adam.adam_step(w, torch.randn(N), torch.zeros(N), torch.zeros(N), **HYPER)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
