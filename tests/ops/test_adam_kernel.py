"""hetmem.ops.adam_step against torch.optim.Adam/AdamW, on every SIMD level of this CPU.

Tolerance: rtol=1e-6 plus atol = one fp32 ulp at the largest magnitude the quantity's
operands take (the parameter before and after, the gradients for exp_avg, their squares
for exp_avg_sq).  The kernel does torch's operations in torch's order without FMA, but
torch's own vectorized CPU kernels fuse some of them (lerp, addcmul), so single elements
differ by an ulp of their operands; where an element is the difference of two close
operands (a parameter crossing zero, a moment near zero) that ulp is large relative to
the result, and no fp32 implementation can do better than the ulp of the operands.  A
wrong formula (a missing bias correction, eps in the wrong place, the wrong weight decay)
moves elements by orders of magnitude more.
"""
from __future__ import annotations

import functools

import pytest
import torch

from hetmem.ops import adam

SIZES = (1, 7, 15, 16, 17, 1023, 2**20 + 3)
STEPS = 10
# Several param groups with different hyperparameters; beta1=0.3 takes torch's other
# lerp formula (weight >= 0.5), eps=1e-3 makes eps matter, one group has no weight decay.
GROUPS = (
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1),
    dict(lr=1e-1, betas=(0.3, 0.9), eps=1e-6, weight_decay=0.05),
)
LEVELS = adam.available_simd_levels()


@pytest.fixture(autouse=True)
def _restore_settings():
    level, threads, threshold = adam.simd_level(), adam.get_num_threads(), adam.get_serial_threshold()
    yield
    adam.set_simd_level(level)
    adam.set_num_threads(threads)
    adam.set_serial_threshold(threshold)


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, what: str, scale: float = 0.0) -> None:
    """rtol=1e-6, atol = one ulp at max(|expected|, scale): scale is the operands' magnitude."""
    atol = torch.finfo(torch.float32).eps * max(expected.abs().max().item(), scale)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=atol, msg=lambda m: f"{what}: {m}")


def view_at(n: int, offset: int, dtype=torch.float32) -> torch.Tensor:
    """A length-n view starting `offset` elements into a larger buffer (unaligned for odd offsets)."""
    return torch.empty(n + offset + 5, dtype=dtype)[offset:offset + n]


@functools.lru_cache(maxsize=None)
def torch_reference(n: int, decoupled: bool):
    """torch.optim.Adam/AdamW, one group per GROUPS entry, STEPS steps: inputs and results."""
    gen = torch.Generator().manual_seed(n * 2 + decoupled)
    params = [torch.randn(n, generator=gen) for _ in GROUPS]
    grads = [[torch.randn(n, generator=gen) for _ in GROUPS] for _ in range(STEPS)]
    ref = [p.clone().requires_grad_() for p in params]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([dict(params=[r], **g) for r, g in zip(ref, GROUPS)])
    for step_grads in grads:
        for r, g in zip(ref, step_grads):
            r.grad = g.clone()
        opt.step()
    results = [(r.detach(), opt.state[r]["exp_avg"], opt.state[r]["exp_avg_sq"]) for r in ref]
    return params, grads, results


def operand_scales(params, grads, k: int) -> tuple[float, float, float]:
    """The largest magnitudes behind param, exp_avg and exp_avg_sq of group k."""
    g_max = max(step_grads[k].abs().max().item() for step_grads in grads)
    return params[k].abs().max().item(), g_max, g_max * g_max


def run_hetmem(params, grads, decoupled: bool, aligned: bool):
    """The same steps through adam_step on (optionally unaligned) buffers."""
    results = []
    for k, hyper in enumerate(GROUPS):
        n = params[k].numel()
        offsets = (0, 0, 0, 0) if aligned else (1, 3, 0, 2)  # param, grad, exp_avg, exp_avg_sq
        p, m, v = view_at(n, offsets[0]), view_at(n, offsets[2]), view_at(n, offsets[3])
        p.copy_(params[k])
        m.zero_()
        v.zero_()
        g = view_at(n, offsets[1])
        for step, step_grads in enumerate(grads, start=1):
            g.copy_(step_grads[k])
            adam.adam_step(p, g, m, v, step=step, lr=hyper["lr"], beta1=hyper["betas"][0], beta2=hyper["betas"][1],
                           eps=hyper["eps"], weight_decay=hyper["weight_decay"], decoupled=decoupled)
            assert torch.equal(g, step_grads[k]), "adam_step modified grad"
        results.append((p, m, v))
    return results


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("n", SIZES)
def test_fp32_parity_with_torch_on_every_level(n, decoupled):
    params, grads, expected = torch_reference(n, decoupled)
    adam.set_serial_threshold(0)  # split every call that has 2 blocks (2**17 elements) or more
    for level in LEVELS:
        assert adam.set_simd_level(level) == level
        for threads in (1, 2):
            adam.set_num_threads(threads)
            for aligned in (True, False):
                got = run_hetmem(params, grads, decoupled, aligned)
                for k, (g_t, e_t) in enumerate(zip(got, expected)):
                    scales = operand_scales(params, grads, k)
                    for name, a, e, scale in zip(("param", "exp_avg", "exp_avg_sq"), g_t, e_t, scales):
                        assert_fp32_close(a, e, f"{level} threads={threads} aligned={aligned} group {k} {name}",
                                          scale)


def test_every_level_gives_the_same_bits():
    # The scalar path is the reference for the SIMD tails, so the levels must agree exactly.
    params, grads, _ = torch_reference(2**20 + 3, True)
    results = {}
    for level in LEVELS:
        adam.set_simd_level(level)
        results[level] = run_hetmem(params, grads, True, aligned=False)
    for level in LEVELS:
        for got, want in zip(results[level], results[LEVELS[0]]):
            for a, b in zip(got, want):
                assert torch.equal(a, b), f"{level} differs from {LEVELS[0]}"


def manual_adam(p, g, m, v, *, step, lr, beta1, beta2, eps, weight_decay, decoupled, bias_correction):
    """torch.optim.Adam's single-tensor update written out, with bias correction switchable."""
    if weight_decay:
        if decoupled:
            p.mul_(1 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1 = 1 - beta1 ** step if bias_correction else 1.0
    bc2 = 1 - beta2 ** step if bias_correction else 1.0
    p.addcdiv_(m, (v.sqrt() / bc2 ** 0.5).add_(eps), value=-lr / bc1)


@pytest.mark.parametrize("bias_correction", [True, False])
def test_bias_correction_switch(bias_correction):
    gen = torch.Generator().manual_seed(3)
    n = 4099
    p = torch.randn(n, generator=gen)
    m, v = torch.zeros(n), torch.zeros(n)
    rp, rm, rv = p.clone(), m.clone(), v.clone()
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, decoupled=True)
    for step in range(1, 6):
        g = torch.randn(n, generator=gen)
        adam.adam_step(p, g, m, v, step=step, bias_correction=bias_correction, **hyper)
        manual_adam(rp, g, rm, rv, step=step, bias_correction=bias_correction, **hyper)
    for name, a, e in (("param", p, rp), ("exp_avg", m, rm), ("exp_avg_sq", v, rv)):
        assert_fp32_close(a, e, name)


# -- mixed precision -----------------------------------------------------------------------

def mixed_inputs(n: int, grad_dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen)
    grads = [(torch.randn(n, generator=gen) * 512).to(grad_dtype) for _ in range(4)]
    return p, grads


@pytest.mark.parametrize("n", (1, 17, 1023, 2**20 + 3))
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, None], ids=["out_bf16", "out_fp16", "no_out"])
@pytest.mark.parametrize("grad_scale", [1.0, 512.0, 3.0])
def test_mixed_precision_matches_fp32_reference(n, grad_dtype, out_dtype, grad_scale):
    p0, grads = mixed_inputs(n, grad_dtype, seed=n)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=False)
    for level in LEVELS:
        adam.set_simd_level(level)
        # fed the 16-bit grads, on unaligned views (odd element offsets, all different)
        p, m, v = view_at(n, 1).copy_(p0), view_at(n, 2).zero_(), view_at(n, 5).zero_()
        g = view_at(n, 3, grad_dtype)
        rp, rm, rv = p0.clone(), torch.zeros(n), torch.zeros(n)        # fed grad.float() / grad_scale
        tp = p0.clone().requires_grad_()
        topt = torch.optim.Adam([tp], lr=1e-2, weight_decay=0.1)
        out = None if out_dtype is None else view_at(n, 7, out_dtype).fill_(7.0)
        for step, step_grad in enumerate(grads, start=1):
            g.copy_(step_grad)
            adam.adam_step(p, g, m, v, step=step, grad_scale=grad_scale, out=out, **hyper)
            assert torch.equal(g, step_grad), "adam_step modified grad"
            g32 = g.float() / grad_scale
            adam.adam_step(rp, g32, rm, rv, step=step, **hyper)
            tp.grad = g32.clone()
            topt.step()
            if out is not None:
                assert torch.equal(out, p.to(out_dtype)), f"{level}: out is not param rounded to {out_dtype}"
        # The in-kernel unscaling is exactly a float division: the same bits as the fp32 path.
        for name, a, e in (("param", p, rp), ("exp_avg", m, rm), ("exp_avg_sq", v, rv)):
            assert torch.equal(a, e), f"{level}: {name} differs from the fp32 kernel fed grad.float()/grad_scale"
        state = topt.state[tp]
        for name, a, e in (("param", p, tp.detach()), ("exp_avg", m, state["exp_avg"]),
                           ("exp_avg_sq", v, state["exp_avg_sq"])):
            assert_fp32_close(a, e, f"{level} {name} vs torch.optim.Adam")


@pytest.mark.parametrize("n", (17, 1023, 2**20 + 3))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_grad_and_out_may_be_the_same_memory(n, dtype):
    p0, grads = mixed_inputs(n, dtype, seed=7)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True, grad_scale=64.0)
    adam.set_serial_threshold(0)
    for level in LEVELS:
        adam.set_simd_level(level)
        p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
        ap, am, av = p0.clone(), torch.zeros(n), torch.zeros(n)
        out = torch.empty(n, dtype=dtype)
        for step, g in enumerate(grads, start=1):
            adam.adam_step(p, g, m, v, step=step, out=out, **hyper)
            slot = g.clone()                    # the engine's slot: holds grad, receives param
            adam.adam_step(ap, slot, am, av, step=step, out=slot, **hyper)
            assert torch.equal(slot, out), f"{level}: aliased out differs from a separate out"
        for a, b in ((p, ap), (m, am), (v, av)):
            assert torch.equal(a, b), f"{level}: aliasing grad and out changed the fp32 results"


def special_floats(dtype: torch.dtype) -> torch.Tensor:
    """fp32 values at, just below and just above every rounding boundary of `dtype`,
    over the whole fp32 range of both signs: subnormals, overflow, inf and NaN included."""
    shift = 16 if dtype == torch.bfloat16 else 13
    offsets = torch.tensor([0, (1 << (shift - 1)) - 1, 1 << (shift - 1), (1 << (shift - 1)) + 1, (1 << shift) - 1],
                           dtype=torch.int64)
    bases = torch.arange(1 << (32 - shift), dtype=torch.int64) << shift
    bits = (bases[:, None] + offsets[None, :]).flatten()
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)
    return bits.view(torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_out_rounds_like_torch_everywhere(dtype):
    # lr=0 leaves param as it is, so out must be exactly param.to(dtype) for every value.
    values = special_floats(dtype)
    n = values.numel()
    for level in LEVELS:
        adam.set_simd_level(level)
        p = values.clone()
        out = torch.empty(n, dtype=dtype)
        adam.adam_step(p, torch.zeros(n), torch.zeros(n), torch.zeros(n), step=1, lr=0.0, beta1=0.9, beta2=0.999,
                       eps=1.0, weight_decay=0.0, decoupled=False, out=out)
        expected = p.to(dtype)
        nan = expected.isnan()
        assert torch.equal(out.isnan(), nan), f"{level}: NaN positions differ"
        assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16)), \
            f"{level}: rounding to {dtype} differs from torch"
        if dtype == torch.float16:  # the interesting cases are in there
            assert (expected.abs() < 6.1e-5).logical_and(expected != 0).any()   # fp16 subnormals
            assert (values.abs() > 65504).logical_and(expected.isinf()).any()   # overflow to inf


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_16bit_grads_are_read_exactly(grad_dtype):
    # grad -> fp32 must be exact (lr=0, beta1=0: exp_avg becomes the gradient itself)
    values = special_floats(torch.bfloat16 if grad_dtype == torch.bfloat16 else torch.float16)
    g = values.to(grad_dtype)
    g = g[~g.isnan() & ~g.isinf()]
    n = g.numel()
    for level in LEVELS:
        adam.set_simd_level(level)
        m = torch.full((n,), 3.0)
        adam.adam_step(torch.zeros(n), g, m, torch.zeros(n), step=1, lr=0.0, beta1=0.0, beta2=0.999,
                       eps=1.0, weight_decay=0.0, decoupled=False)
        assert torch.equal(m, g.float()), f"{level}: {grad_dtype} gradient not converted exactly"


# -- threads, probe, environment -----------------------------------------------------------

def test_thread_settings_validate():
    adam.set_num_threads(1)
    assert adam.get_num_threads() == 1
    adam.set_num_threads(3)
    assert adam.get_num_threads() == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads must be an int >= 1"):
            adam.set_num_threads(bad)
    with pytest.raises(ValueError, match="level must be one of scalar, avx2, avx512"):
        adam.set_simd_level("sse")


def test_more_threads_than_cores_still_correct():
    n = 2**18 + 5
    p0, grads = mixed_inputs(n, torch.bfloat16, seed=11)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False)
    results = []
    adam.set_serial_threshold(0)
    for threads in (1, 5):
        adam.set_num_threads(threads)
        p, m, v, out = p0.clone(), torch.zeros(n), torch.zeros(n), torch.empty(n, dtype=torch.bfloat16)
        for step, g in enumerate(grads, start=1):
            adam.adam_step(p, g, m, v, step=step, out=out, **hyper)
        results.append((p, m, v, out))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# The benchmark's ways to move the probe's bytes, and all three changes at once.
PROBE_OPTIONS = {"adam_loop": {}, "no_prefetch": {"prefetch": False},
                 "static_split": {"static_split": True, "prefetch": False}, "streaming_stores": {"streaming_stores": True},
                 "all_changed": {"prefetch": False, "streaming_stores": True, "static_split": True}}


@pytest.mark.parametrize("options", PROBE_OPTIONS.values(), ids=PROBE_OPTIONS.keys())
@pytest.mark.parametrize("grad_dtype,out_dtype", [(torch.float32, None), (torch.bfloat16, torch.bfloat16),
                                                  (torch.float16, torch.float16)])
def test_stream_probe_touches_every_element(grad_dtype, out_dtype, options):
    # The roofline is only honest if the probe really reads and writes every byte, whichever
    # way it moves them: on every level, with 3 threads (runs of uneven length, blocks taken
    # from others' runs), arrays 64-byte aligned (streaming stores used) or not.
    n = 2**20 + 3
    gen = torch.Generator().manual_seed(5)
    p, m, v = (torch.randn(n, generator=gen) for _ in range(3))
    g = torch.randn(n, generator=gen).to(grad_dtype)
    out = None if out_dtype is None else torch.empty(n, dtype=out_dtype)
    expected = [p + g.float(), m + g.float(), v + g.float() * g.float()]
    adam.set_serial_threshold(0)
    adam.set_num_threads(3)
    for level in LEVELS:
        adam.set_simd_level(level)
        for offset in (0, 1):
            p2, m2, v2 = (view_at(n, offset).copy_(t) for t in (p, m, v))
            if out is not None:
                out.fill_(0)
            adam.stream_probe(p2, g, m2, v2, out=out, **options)
            for name, a, e in zip(("param", "exp_avg", "exp_avg_sq"), (p2, m2, v2), expected):
                assert torch.equal(a, e), f"{level} offset={offset} {name}"
            if out is not None:
                assert torch.equal(out.view(torch.int16), (p2.view(torch.int32) >> 16).to(torch.int16))


def test_stream_probe_options_must_be_bools():
    p, g, m, v = (torch.zeros(4) for _ in range(4))
    for name in ("prefetch", "streaming_stores", "static_split"):
        with pytest.raises(ValueError, match=f"{name} must be a bool, found int 1"):
            adam.stream_probe(p, g, m, v, **{name: 1})


def test_simd_env_caps_the_level_and_threads_default_to_usable_cores(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import os; from hetmem.ops import adam; "
            "print(adam.simd_level(), adam.get_num_threads(), len(os.sched_getaffinity(0)))")
    env = dict(os.environ, HETMEM_ADAM_SIMD="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    level, threads, cores = out.stdout.split()
    assert level == "scalar" and threads == cores
    env["HETMEM_ADAM_SIMD"] = "sse9"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "HETMEM_ADAM_SIMD='sse9' is not a SIMD level" in bad.stderr


def test_pool_works_after_fork():
    # A forked child has none of the parent's pool threads: its first call must build a
    # new pool, not wait forever for threads that do not exist.  (The child touches no
    # torch op that could use torch's own, fork-unsafe, intra-op pool.)
    import os
    import time

    n = 2**18
    p0, grads = mixed_inputs(n, torch.float32, seed=2)
    kw = dict(step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False)
    adam.set_num_threads(2)
    adam.set_serial_threshold(0)
    expected = p0.clone()
    adam.adam_step(expected, grads[0], torch.zeros(n), torch.zeros(n), **kw)  # the parent's pool exists now
    shared = p0.clone().share_memory_()
    m, v = torch.zeros(n), torch.zeros(n)
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 when the step returned
        try:
            adam.adam_step(shared, grads[0], m, v, **kw)
        finally:
            os._exit(0 if adam.get_num_threads() == 2 else 1)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("adam_step in a forked child did not return within 60 s")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert torch.equal(shared, expected)
