"""Non-finite steps are skipped in every dtype, and no error in backward/step wedges the engine.

A skipped step changes nothing (weights, Adam moments, per-parameter step counts), so a run
with a poisoned batch equals the run that never saw that batch.  Every run here uses a budget
that forces chunks to move in every steady step, and asserts that they did.
"""
from __future__ import annotations

import math

import pytest
import torch

import hetmem
from tests.engine.helpers import batches, config, pair, steady_steps, tiny_gpt

TIGHT = "2304KiB"      # fp32: chunks move in every step (tests/engine/test_parity.py)
TIGHT_16 = "1280KiB"   # the same for 2-byte parameters
BAD = 4  # index of the poisoned batch: after the warm-up, when bf16/fp16 keep gradients in-slot


def poison(loss: torch.Tensor, how: str) -> torch.Tensor:
    return loss * 1e30 if how == "1e30" else loss * float("inf")


def run_engine(engine, data, bad: str | None = None, skip_index: int | None = None):
    """Losses per batch (None where skipped), and each step's StepResult."""
    losses, results = [], []
    for i, (x, y) in enumerate(data):
        if i == skip_index:
            losses.append(None)
            continue
        loss = engine(x, y)
        value = loss.item()
        if bad is not None and i == BAD:
            loss = poison(loss, bad)
        engine.backward(loss)
        assert engine.step()
        results.append(engine.last_step)
        losses.append(value)
    return losses, results


def run_plain_skipping(model, data, *, clip):
    """torch.optim.AdamW that skips the update (and its step count) for batch BAD."""
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    losses = []
    for i, (x, y) in enumerate(data):
        loss = model(x, y)
        losses.append(loss.item())
        if i == BAD:
            continue
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad()
    return losses


def tight(dtype: str) -> str:
    return TIGHT if dtype == "fp32" else TIGHT_16


def assert_moved(engine):
    steady = steady_steps(engine)
    assert steady and all(s["evictions"] for s in steady), "the budget did not force chunks to move"


def close_losses(got, expected):
    pairs = [(g, e) for i, (g, e) in enumerate(zip(got, expected)) if i != BAD and g is not None]
    torch.testing.assert_close(torch.tensor([g for g, _ in pairs]), torch.tensor([e for _, e in pairs]),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad,clip", [("1e30", 1.0), ("inf", None), ("1e30", None)])
def test_fp32_poisoned_batch_equals_torch_that_skipped_it(bad, clip, caplog):
    ref, model = pair()
    data = batches(8, seed=5)
    expected = run_plain_skipping(ref, data, clip=clip)
    engine = hetmem.initialize(model, config(device_budget=TIGHT, gradient_clipping=clip))
    with caplog.at_level("WARNING", logger="hetmem.optimizer"):
        got, results = run_engine(engine, data, bad=bad)
    skipped = [r for r in results if r.skipped]
    assert len(skipped) == 1 and results[BAD].skipped
    assert "non-finite gradient norm" in results[BAD].reason
    assert any("optimizer step skipped" in r.getMessage() for r in caplog.records)
    close_losses(got, expected)
    state = engine.state_dict()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert {s.step for s in engine.layout.slots} == {len(data) - 1}  # Adam's step count did not advance
    assert engine.global_step == len(data)                           # ... global_step counts the skip
    assert_moved(engine)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("bad", ["1e30", "inf"])
def test_low_precision_poisoned_batch_equals_the_run_without_it(dtype, bad):
    data = batches(8, seed=6)
    runs = {}
    for name in ("poisoned", "without"):
        model = tiny_gpt(1)
        engine = hetmem.initialize(model, config(device_budget=tight(dtype), dtype=dtype, gradient_clipping=1.0,
                                                 loss_scale=1024.0 if dtype == "fp16" else "dynamic"))
        if name == "poisoned":
            losses, results = run_engine(engine, data, bad=bad)
            assert results[BAD].skipped and not any(r.skipped for i, r in enumerate(results) if i != BAD)
            assert any(g.grad_in_slot for g in engine.layout.groups), "in-slot gradients were not exercised"
        else:
            losses, _ = run_engine(engine, data, skip_index=BAD)
        assert_moved(engine)
        runs[name] = (losses, engine.state_dict(), [s.step for s in engine.layout.slots])
    close_losses(runs["poisoned"][0], runs["without"][0])
    for key, value in runs["without"][1].items():
        torch.testing.assert_close(runs["poisoned"][1][key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert runs["poisoned"][2] == runs["without"][2]


def test_fp16_dynamic_scale_still_backs_off_on_overflow():
    _, model = pair()
    engine = hetmem.initialize(model, config(device_budget=TIGHT_16, dtype="fp16"))
    x, y = batches(1)[0]
    before = engine.loss_scale
    engine.backward(engine(x, y) * 1e30)
    engine.step()
    assert engine.last_step.skipped and "fp16 overflow" in engine.last_step.reason
    assert engine.loss_scale == before / 2
    engine.backward(engine(x, y))
    engine.step()
    assert not engine.last_step.skipped and math.isfinite(engine.last_step.grad_norm)


class FailOnce(torch.nn.Module):
    """Identity whose backward raises once when armed (after later layers' gradients landed)."""

    def __init__(self):
        super().__init__()
        self.armed = False

    def forward(self, x):
        return _Fail.apply(x, self)


class _Fail(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, owner):
        ctx.owner = owner
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.owner.armed:
            ctx.owner.armed = False
            raise RuntimeError("injected failure in backward")
        return grad, None


def gpt_with_failure(seed: int):
    model = tiny_gpt(seed)
    fail = FailOnce()
    block = model.blocks[1]
    block.register_forward_hook(lambda module, args, out: fail(out))
    return model, fail


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_an_error_in_backward_leaves_the_engine_training(dtype):
    """The failed micro-step's partial gradients (in-slot ones included) are dropped: the run
    equals the run without that batch."""
    data = batches(7, seed=7)
    runs = {}
    for name in ("failed", "without"):
        model, fail = gpt_with_failure(2)
        engine = hetmem.initialize(model, config(device_budget=tight(dtype), dtype=dtype, gradient_clipping=1.0))
        losses = []
        for i, (x, y) in enumerate(data):
            if i == BAD and name == "without":
                continue
            loss = engine(x, y)
            if i == BAD:
                fail.armed = True
                with pytest.raises(RuntimeError, match="injected failure"):
                    engine.backward(loss)
                assert not engine.step()  # nothing pending, nothing counted
                continue
            engine.backward(loss)
            assert engine.step()
            losses.append(loss.item())
        assert_moved(engine)
        runs[name] = (losses, engine.state_dict(), engine.global_step)
    torch.testing.assert_close(torch.tensor(runs["failed"][0]), torch.tensor(runs["without"][0]), rtol=1e-5, atol=0)
    for key, value in runs["without"][1].items():
        torch.testing.assert_close(runs["failed"][1][key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert runs["failed"][2] == runs["without"][2]


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_a_step_that_raised_part_way_is_finished_exactly_by_the_next_step(monkeypatch, tmp_path, overlap):
    data = batches(6, seed=8)
    runs = {}
    for name in ("interrupted", "plain"):
        _, model = pair(seed=3)
        engine = hetmem.initialize(model, config(device_budget=TIGHT_16, dtype="bf16", gradient_clipping=0.5,
                                                 overlap_step=overlap, nvme_dir=str(tmp_path / name)))
        assert engine.adam.overlap is overlap  # the NVMe tier on: overlap applies
        if name == "interrupted":
            real = engine.adam._step_group
            calls = {"n": 0}

            def flaky(group, grad_scale):
                calls["n"] += 1
                if calls["n"] == 3 * len(engine.layout.groups) + 2:  # step 4, third group
                    raise OSError(5, "injected IO error")
                return real(group, grad_scale)

            monkeypatch.setattr(engine.adam, "_step_group", flaky)
        losses, raised = [], []
        for i, (x, y) in enumerate(data):
            try:
                loss = engine(x, y)  # overlapped: applies the previous step, where the error surfaces
            except OSError as exc:
                assert "call engine.step() again" in str(exc) and overlap and i == 4
                raised.append(i)
                assert not engine.step()  # applies the rest; the step counted when it was taken
                loss = engine(x, y)
            engine.backward(loss)
            try:
                engine.step()
            except OSError as exc:
                assert "call engine.step() again" in str(exc) and not overlap and i == 3
                raised.append(i)
                assert engine.step()
            losses.append(loss.item())
        assert raised == ([] if name == "plain" else [4 if overlap else 3])
        runs[name] = (losses, engine.state_dict(), engine.global_step)
        assert_moved(engine)
    assert runs["interrupted"][0] == runs["plain"][0]
    for key, value in runs["plain"][1].items():
        torch.testing.assert_close(runs["interrupted"][1][key], value, rtol=0, atol=0, msg=key)
    assert runs["interrupted"][2] == runs["plain"][2] == len(data)


def test_zero_grad_gives_in_slot_weights_back(tmp_path):
    _, model = pair()
    engine = hetmem.initialize(model, config(device_budget=TIGHT_16, dtype="bf16"))
    data = batches(4, seed=9)
    for x, y in data[:3]:
        engine.backward(engine(x, y))
        engine.step()
    assert any(g.grad_in_slot for g in engine.layout.groups)
    weights = {n: p.detach().clone() for n, p in engine.state_dict().items()}
    engine.backward(engine(*data[3]))
    engine.zero_grad()
    assert not engine.step()  # nothing pending: no step, nothing counted
    assert engine.global_step == 3
    engine.save_checkpoint(tmp_path)  # allowed again: no gradient holds a weight's place
    for name, value in engine.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0, msg=name)
    # the compute copies are back too: an eval forward equals a fresh engine's on these weights
    with torch.no_grad():
        got = engine(*data[0]).item()
    fresh = tiny_gpt(0)
    fresh.load_state_dict(weights)
    other = hetmem.initialize(fresh, config(device_budget=TIGHT_16, dtype="bf16"))
    with torch.no_grad():
        assert other(*data[0]).item() == got


def test_step_twice_after_one_backward_counts_one_step():
    _, model = pair()
    engine = hetmem.initialize(model, config(device_budget=TIGHT))
    x, y = batches(1)[0]
    engine.backward(engine(x, y))
    assert engine.step()
    weights = engine.state_dict()
    assert not engine.step()
    assert engine.global_step == 1
    for key, value in engine.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_a_backward_that_raised_in_the_warm_up_counts_no_gradient_arrivals():
    """Arrival counts are per backward: the failed one's do not make the warm-up see each
    gradient twice, so the same groups keep their gradients in-slot as without the failure."""
    data = batches(3, seed=9)
    in_slot = {}
    for name in ("failed", "without"):
        model, fail = gpt_with_failure(2)
        engine = hetmem.initialize(model, config(device_budget=TIGHT_16, dtype="bf16"))
        if name == "failed":
            loss = engine(*data[0])
            fail.armed = True
            with pytest.raises(RuntimeError, match="injected failure"):
                engine.backward(loss)
        for x, y in data:
            engine.backward(engine(x, y))
            assert engine.step()
        in_slot[name] = [g.grad_in_slot for g in engine.layout.groups if g.trainable]
    assert any(in_slot["without"])
    assert in_slot["failed"] == in_slot["without"]
