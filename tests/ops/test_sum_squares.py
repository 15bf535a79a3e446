"""hetmem.ops.adam.squared_norm: the gradient norm's sum of squares (the cpu_adam op's sum_squares
for 16-bit CPU tensors, torch's vector_norm for the rest).

The op's sum is within one fp32 rounding of a float64 reference (each square is exact in float64,
the sum is rounded once to fp32 at the end), the same bits on every SIMD level and at every
alignment, in every dtype it takes; non-finite where the fp32 norm is (NaN, infinity, a sum past
fp32's range); torch's result exactly for fp32, other dtypes, and where the op cannot run.
"""
from __future__ import annotations

import pytest
import torch

from hetmem.ops import adam

LEVELS = adam.available_simd_levels()
SIZES = (0, 1, 15, 16, 17, 1023, 2**20 + 5)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

needs_op = pytest.mark.skipif(not adam.is_available(), reason="the cpu_adam op is unavailable here")


@pytest.fixture(autouse=True)
def _restore_level():
    level = adam.simd_level()
    yield
    if level in adam.SIMD_LEVELS:  # not the fallback
        adam.set_simd_level(level)


def reference(t: torch.Tensor) -> float:
    return float(torch.sum(t.double() ** 2))


def op_sum(t: torch.Tensor) -> torch.Tensor:
    """The op on any dtype it takes (squared_norm uses it for the 16-bit ones), as squared_norm rounds."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return adam.squared_norm(t)
    t = t.contiguous()
    return torch.tensor(adam._op().sum_squares(t.data_ptr(), t.numel(), NAMES[t.dtype]), dtype=torch.float32)


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_every_level_gives_the_same_bits_close_to_float64(n, dtype):
    gen = torch.Generator().manual_seed(n)
    for offset in (0, 1, 3):  # unaligned starts: lanes follow the index, not the address
        buffer = (torch.randn(n + offset, generator=gen) * 7).to(dtype)
        t = buffer[offset:]
        got = {}
        for level in LEVELS:
            adam.set_simd_level(level)
            got[level] = op_sum(t)
        values = {v.item() for v in got.values()}
        assert len(values) == 1, f"n={n} {dtype} offset {offset}: levels differ {got}"
        value = got[LEVELS[0]]
        assert value.dtype == torch.float32 and value.dim() == 0
        expected = torch.tensor(reference(t), dtype=torch.float32)  # rounded once, as the op rounds
        assert value.item() == expected.item() or abs(value.item() - expected.item()) <= 1e-6 * expected.item()
        # the same values at another alignment give the same bits
        assert op_sum(t.clone()).item() == value.item()


@needs_op
def test_non_contiguous_tensor_equals_its_contiguous_copy():
    t = torch.randn(64, 48).bfloat16().t()
    assert not t.is_contiguous()
    assert adam.squared_norm(t).item() == adam.squared_norm(t.contiguous()).item()


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_like_the_fp32_norm(dtype):
    t = torch.randn(1000).to(dtype)
    nan, inf = t.clone(), t.clone()
    nan[517] = float("nan")
    inf[3] = float("-inf")
    for fn in (op_sum, adam.squared_norm):
        assert torch.isnan(fn(nan))
        assert fn(inf).item() == float("inf")
    if dtype != torch.float16:  # fp16 cannot hold 1e30
        huge = t.clone()
        huge[10] = 1e30  # finite, but its square is past fp32's range: the fp32 norm says inf too
        assert op_sum(huge).item() == float("inf") and adam.squared_norm(huge).item() == float("inf")
        assert torch.linalg.vector_norm(huge, dtype=torch.float32).square().item() == float("inf")


@needs_op
def test_matches_torch_vector_norm_within_fp32_rounding():
    g = torch.randn(4096, 1024).bfloat16()
    ours = adam.squared_norm(g).item()
    torchs = torch.linalg.vector_norm(g, dtype=torch.float32).square().item()
    exact = reference(g)
    assert abs(ours - exact) <= 1e-7 * exact           # one fp32 rounding
    assert abs(torchs - exact) <= 1e-3 * exact         # torch's fp32 accumulation, for scale


def test_fp32_and_other_dtypes_take_torch():
    g = torch.randn(4096, 257)
    assert adam.squared_norm(g).item() == torch.linalg.vector_norm(g, dtype=torch.float32).square().item()
    t = torch.arange(10, dtype=torch.float64)
    torch.testing.assert_close(adam.squared_norm(t), torch.tensor(285.0, dtype=torch.float32))
    meta = torch.empty(8, device="meta")
    assert adam.squared_norm(meta).device.type == "meta"


def test_fallback_without_the_op(monkeypatch):
    monkeypatch.setattr(adam, "_op", lambda: None)
    g = torch.randn(100).bfloat16()
    torch.testing.assert_close(adam.squared_norm(g), torch.linalg.vector_norm(g, dtype=torch.float32).square())
