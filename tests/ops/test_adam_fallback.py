"""The pure-PyTorch fallback (HETMEM_DISABLE_OPS=cpu_adam): same semantics, one warning."""
from __future__ import annotations

import importlib
import logging

import pytest
import torch

from hetmem.ops import adam
from hetmem.ops.builder import OpBuildError

from .test_adam_kernel import GROUPS, assert_fp32_close, manual_adam, mixed_inputs, operand_scales, torch_reference


@pytest.fixture
def fallback(monkeypatch):
    """adam as if the op could not be built; the real op again afterwards."""
    monkeypatch.setenv("HETMEM_DISABLE_OPS", "cpu_adam")
    # (hetmem.ops.builder the module: the package re-exports a function of that name)
    builder_module = importlib.import_module("hetmem.ops.builder")
    monkeypatch.delitem(builder_module._LOADED, "cpu_adam", raising=False)
    adam._reset()
    yield
    adam._reset()


@pytest.fixture(params=["fused", "torch_ops"])
def fallback_path(request, fallback, monkeypatch):
    """Both fallback paths: torch's fused CPU Adam, and the single-tensor torch ops."""
    if request.param == "torch_ops":
        monkeypatch.setattr(adam, "_FUSED", None)
    elif adam._FUSED is None:
        pytest.skip("this torch has no fused CPU Adam")
    return request.param


def test_one_warning_names_the_reason(fallback, caplog):
    caplog.set_level(logging.WARNING, logger="hetmem.ops.adam")
    n = 5
    for _ in range(3):
        adam.adam_step(torch.zeros(n), torch.ones(n), torch.zeros(n), torch.zeros(n), step=1, lr=1e-3, beta1=0.9,
                       beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False)
    assert adam.simd_level() == adam.FALLBACK_LEVEL
    assert adam.available_simd_levels() == ()
    assert adam.get_num_threads() == torch.get_num_threads()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "HETMEM_DISABLE_OPS" in warnings[0].getMessage() and "fallback" in warnings[0].getMessage()
    assert "HETMEM_DISABLE_OPS" in adam.unavailable_reason()
    with pytest.raises(OpBuildError, match="stream_probe needs the cpu_adam op"):
        adam.stream_probe(torch.zeros(n), torch.ones(n), torch.zeros(n), torch.zeros(n))


def test_validation_still_applies(fallback):
    with pytest.raises(ValueError, match="adam_step: grad must be contiguous"):
        adam.adam_step(torch.zeros(6), torch.zeros(2, 3).t(), torch.zeros(6), torch.zeros(6), step=1, lr=1e-3,
                       beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False)


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("n", (1, 17, 1023, 2**20 + 3))
def test_fp32_parity_with_torch(fallback_path, n, decoupled):
    params, grads, expected = torch_reference(n, decoupled)
    for k, hyper in enumerate(GROUPS):
        p, m, v = params[k].clone(), torch.zeros(n), torch.zeros(n)
        for step, step_grads in enumerate(grads, start=1):
            g = step_grads[k].clone()
            adam.adam_step(p, g, m, v, step=step, lr=hyper["lr"], beta1=hyper["betas"][0], beta2=hyper["betas"][1],
                           eps=hyper["eps"], weight_decay=hyper["weight_decay"], decoupled=decoupled)
            assert torch.equal(g, step_grads[k]), "the fallback modified grad"
        for name, a, e, scale in zip(("param", "exp_avg", "exp_avg_sq"), (p, m, v), expected[k],
                                     operand_scales(params, grads, k)):
            assert_fp32_close(a, e, f"{fallback_path} group {k} {name}", scale)


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_precision_and_aliasing(fallback_path, grad_dtype):
    n = 4099
    p0, grads = mixed_inputs(n, grad_dtype, seed=9)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True, grad_scale=256.0)
    p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
    ap, am, av = p0.clone(), torch.zeros(n), torch.zeros(n)
    rp = p0.clone().requires_grad_()
    ropt = torch.optim.AdamW([rp], lr=1e-2, weight_decay=0.1)
    out = torch.empty(n, dtype=grad_dtype)
    for step, g in enumerate(grads, start=1):
        adam.adam_step(p, g, m, v, step=step, out=out, **hyper)
        assert torch.equal(out, p.to(grad_dtype))
        slot = g.clone()
        adam.adam_step(ap, slot, am, av, step=step, out=slot, **hyper)
        assert torch.equal(slot, out)
        rp.grad = g.float() / 256.0
        ropt.step()
    state = ropt.state[rp]
    for name, a, e in (("param", p, rp.detach()), ("exp_avg", m, state["exp_avg"]),
                       ("exp_avg_sq", v, state["exp_avg_sq"])):
        assert_fp32_close(a, e, name)
    assert torch.equal(ap, p) and torch.equal(am, m) and torch.equal(av, v)


def test_without_bias_correction(fallback):
    gen = torch.Generator().manual_seed(4)
    n = 1000
    p, m, v = torch.randn(n, generator=gen), torch.zeros(n), torch.zeros(n)
    rp, rm, rv = p.clone(), m.clone(), v.clone()
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, decoupled=False)
    for step in range(1, 4):
        g = torch.randn(n, generator=gen)
        adam.adam_step(p, g, m, v, step=step, bias_correction=False, **hyper)
        manual_adam(rp, g, rm, rv, step=step, bias_correction=False, **hyper)
    for a, e in ((p, rp), (m, rm), (v, rv)):
        assert torch.equal(a, e)  # the fallback runs these very torch ops
