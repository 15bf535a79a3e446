"""The user's optimizer: parameter groups and LR schedulers on engine.optimizer, as with torch."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import hetmem
from tests.engine.helpers import batches, config, pair, steady_steps, tiny_gpt
from tests.engine.test_parity import TIGHT


def two_groups(model, lr=1e-3):
    """The usual LLM grouping: decay on matrices; no decay and 2x lr on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": 2 * lr}]


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def run_torch(model, data, make_opt, make_sched=None, clip=None):
    opt = make_opt(model)
    sched = make_sched(opt) if make_sched else None
    losses, lrs = [], []
    for x, y in data:
        lrs.append([g["lr"] for g in opt.param_groups])
        loss = model(x, y)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if sched is not None:
            sched.step(loss.item()) if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau) else sched.step()
    return losses, lrs


def run_engine(engine, data, make_sched=None):
    sched = make_sched(engine.optimizer) if make_sched else None
    losses, lrs = [], []
    for x, y in data:
        lrs.append([g["lr"] for g in engine.optimizer.param_groups])
        loss = engine(x, y)
        engine.backward(loss)
        assert engine.step()
        losses.append(loss.item())
        if sched is not None:
            sched.step(loss.item()) if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau) else sched.step()
    return losses, lrs


def test_two_groups_and_warmup_cosine_match_torch_under_eviction():
    ref, model = pair(bias=True)
    data = batches(16, seed=5)
    make_sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(4, len(data)))  # noqa: E731
    expected, expected_lrs = run_torch(ref, data, lambda m: torch.optim.AdamW(two_groups(m)), make_sched)
    engine = hetmem.initialize(model, config(device_budget=TIGHT), optimizer=torch.optim.AdamW(two_groups(model)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        got, got_lrs = run_engine(engine, data, make_sched)
    assert got_lrs == expected_lrs
    assert len({lr for lrs in got_lrs for lr in lrs}) > 10  # the schedule really moved
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)
    state = engine.state_dict()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-7, msg=key)
    for step in steady_steps(engine):
        assert step["evictions"], f"step {step['step']}: nothing was evicted; the budget is not tight"
    # both groups share chunks: runs split where the group changes
    shared = [g for g in engine.layout.groups
              if len({engine.adam.group_of[id(s)] for s in g.slots if s.trainable}) > 1]
    assert shared


def test_bf16_with_groups_and_schedule_follows_fp32():
    data = batches(30, seed=6)
    curves = {}
    for dtype, budget in (("fp32", TIGHT), ("bf16", "1280KiB")):  # both evict in every step
        _, model = pair(seed=7, bias=True)
        engine = hetmem.initialize(model, config(device_budget=budget, dtype=dtype),
                                   optimizer=torch.optim.AdamW(two_groups(model)))
        sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(5, len(data)))  # noqa: E731
        curves[dtype] = torch.tensor(run_engine(engine, data, sched)[0])
        assert all(s["evictions"] for s in steady_steps(engine)), dtype
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert fp32[-5:].mean() < fp32[:5].mean() * 0.85, "the fp32 run did not learn"
    rel = ((bf16 - fp32).abs() / fp32).max().item()
    assert rel < 0.02, f"bf16 left the fp32 loss curve by {rel:.2%}"


def _sequential(opt):
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warm, decay], milestones=[3])


def _hf_cosine(opt):
    transformers = pytest.importorskip("transformers")
    return transformers.get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=8)


SCHEDULERS = {
    "cosine_annealing": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8),
    # OneCycleLR also cycles beta1 ("momentum"): betas are read at every step too
    "one_cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[3e-3, 6e-3], total_steps=8),
    "sequential": _sequential,
    "plateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=0.5),
    "hf_cosine": _hf_cosine,
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_torch_and_hf_schedulers_work_unchanged(name):
    ref, model = pair(seed=1, bias=True, n_layer=1)
    data = batches(8, seed=8)
    make_sched = SCHEDULERS[name]
    expected, expected_lrs = run_torch(ref, data, lambda m: torch.optim.AdamW(two_groups(m)), make_sched)
    engine = hetmem.initialize(model, config(), optimizer=torch.optim.AdamW(two_groups(model)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, got_lrs = run_engine(engine, data, make_sched)
    assert got_lrs == expected_lrs
    assert len({tuple(lrs) for lrs in got_lrs}) > 1
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)


class LrByHand:
    """Sets every group's lr by hand after each step, as a user may."""

    def __init__(self, optimizer):
        self.optimizer, self.steps = optimizer, 0

    def step(self):
        self.steps += 1
        for group in self.optimizer.param_groups:
            group["lr"] = 1e-3 * (self.steps + 1)


def test_lr_set_by_hand_and_adam_l2_groups():
    ref, model = pair(seed=2)
    data = batches(6, seed=9)
    make = lambda m: torch.optim.Adam(two_groups(m), lr=1e-3)  # noqa: E731 - Adam: L2 in the gradient
    expected, expected_lrs = run_torch(ref, data, make, LrByHand)
    engine = hetmem.initialize(model, config(), optimizer=make(model))
    got, got_lrs = run_engine(engine, data, LrByHand)
    assert got_lrs == expected_lrs and got_lrs[-1] == [6e-3, 6e-3]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)
    assert engine.optimizer.param_groups[0]["decoupled_weight_decay"] is False


def test_parameter_in_no_group_is_not_trained_in_any_precision():
    for dtype in ("fp32", "bf16"):
        _, model = pair(seed=3, bias=True)
        matrices = [p for p in model.parameters() if p.dim() >= 2]
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        engine = hetmem.initialize(model, config(dtype=dtype), optimizer=torch.optim.AdamW(matrices, lr=1e-2))
        for x, y in batches(3, seed=10):
            engine.backward(engine(x, y))
            engine.step()
        after = engine.state_dict()
        for name, value in before.items():
            changed = not torch.equal(after[name], value.float())
            assert changed == (value.dim() >= 2), f"{dtype} {name}: changed={changed}"
            slot = engine.layout.by_name[name]
            compute = engine.manager.payload_in_memory(slot.group.chunks[hetmem.ChunkKind.PARAM])
            if value.dim() < 2:  # the compute copy too (in bf16 its slot held the gradient)
                assert torch.equal(compute.narrow(0, slot.offset, slot.numel).view(slot.shape),
                                   value.to(engine.param_dtype)), f"{dtype} {name}"
        if dtype == "bf16":
            assert all(g.grad_in_slot for g in engine.layout.groups if g.trainable)
        state = engine.optimizer.state_dict()["state"]
        assert sorted(state) == list(range(len(matrices)))


def test_engine_optimizer_is_a_torch_optimizer_whose_step_is_the_engine_step():
    _, model = pair(seed=4)
    engine = hetmem.initialize(model, config(gradient_accumulation_steps=2))
    opt = engine.optimizer
    assert isinstance(opt, torch.optim.Optimizer)
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["weight_decay"] == 0.1
    (x, y), (x2, y2) = batches(2, seed=11)
    loss = engine(x, y)
    with pytest.raises(RuntimeError, match="engine.backward"):
        opt.step()
    engine.backward(loss)
    opt.zero_grad()  # a no-op: the gradient stays in its chunk
    assert all(p.grad is None for p in model.parameters())
    assert not engine.step() and engine.global_step == 0  # not an accumulation boundary
    hooked = []
    opt.register_step_post_hook(lambda optimizer, args, kwargs: hooked.append(optimizer.last_step_ran))
    out = opt.step(closure=lambda: engine.backward(engine(x2, y2)))
    assert out is None and opt.last_step_ran and engine.global_step == 1 and hooked == [True]


def test_invalid_optimizers_and_hyperparameters_raise_naming_them():
    _, model = pair(seed=5)
    with pytest.raises(ValueError, match="SGD"):
        hetmem.initialize(model, config(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    for option in ("amsgrad", "maximize", "differentiable"):
        with pytest.raises(ValueError, match=option):
            hetmem.initialize(model, config(), optimizer=torch.optim.AdamW(model.parameters(), **{option: True}))
    stranger = torch.nn.Parameter(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"parameter 1 \(shape \(3, 5\)"):
        hetmem.initialize(model, config(), optimizer=torch.optim.AdamW([next(model.parameters()), stranger]))
    # fused/foreach are torch's implementation choices: accepted and ignored
    engine = hetmem.initialize(model, config(), optimizer=torch.optim.AdamW(model.parameters(), foreach=True))
    x, y = batches(1, seed=12)[0]
    engine.backward(engine(x, y))
    engine.optimizer.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]=-1.0"):
        engine.step()
    engine.optimizer.param_groups[0]["lr"] = 1e-3  # fixed: the same gradients step normally
    assert engine.step() and engine.global_step == 1


def _continue(model_step, data):
    return [model_step(x, y) for x, y in data]


def test_state_dict_interchanges_with_torch_adamw_both_ways():
    data = batches(8, seed=13)
    first, rest = data[:5], data[5:]

    def torch_step(model, opt):
        def run(x, y):
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.item()
        return run

    def engine_step(engine):
        def run(x, y):
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            return loss.item()
        return run

    # hetmem -> torch
    _, model = pair(seed=6, bias=True)
    engine = hetmem.initialize(model, config(device_budget=TIGHT), optimizer=torch.optim.AdamW(two_groups(model)))
    _continue(engine_step(engine), first)
    plain = tiny_gpt(99, bias=True)
    plain.load_state_dict(engine.state_dict())
    opt = torch.optim.AdamW(two_groups(plain))
    saved = engine.optimizer.state_dict()
    assert set(saved) == {"state", "param_groups"} and saved["state"][0]["step"].item() == 5.0
    opt.load_state_dict(saved)
    expected = _continue(torch_step(plain, opt), rest)
    got = _continue(engine_step(engine), rest)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)

    # torch -> hetmem, through initialize(optimizer=) holding a stepped optimizer's state
    ref = tiny_gpt(7, bias=True)
    opt = torch.optim.AdamW(two_groups(ref))
    _continue(torch_step(ref, opt), first)
    model = copy.deepcopy(ref)
    user_opt = torch.optim.AdamW(two_groups(model))
    user_opt.load_state_dict(opt.state_dict())
    engine = hetmem.initialize(model, config(device_budget=TIGHT), optimizer=user_opt)
    expected = _continue(torch_step(ref, opt), rest)
    got = _continue(engine_step(engine), rest)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)
    round_trip = engine.optimizer.state_dict()
    for index, value in opt.state_dict()["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(round_trip["state"][index][key], value[key], rtol=1e-5, atol=1e-8)

    with pytest.raises(ValueError, match="param groups"):
        engine.optimizer.load_state_dict({"state": {}, "param_groups": saved["param_groups"][:1]})


def test_optimizer_state_dict_refuses_what_host_memory_cannot_hold(monkeypatch):
    _, model = pair(seed=10)
    engine = hetmem.initialize(model, config())
    x, y = batches(1)[0]
    engine.backward(engine(x, y))
    engine.step()
    monkeypatch.setattr(hetmem.optimizer_groups, "available_host_bytes", lambda: 1000)
    with pytest.raises(RuntimeError, match="engine.save_checkpoint"):
        engine.optimizer.state_dict()
    monkeypatch.undo()
    assert len(engine.optimizer.state_dict()["state"]) == len(list(model.parameters()))


def test_meta_model_with_optimizer_over_meta_parameters():
    with torch.device("meta"):
        model = tiny_gpt(0)
    opt = torch.optim.AdamW(two_groups(model))
    engine = hetmem.initialize(model, config(), optimizer=opt)
    params = [p for g in engine.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}  # the materialised ones
    x, y = batches(1)[0]
    engine.backward(engine(x, y))
    assert engine.step()


def test_no_gradient_clipping_by_default_as_in_torch():
    assert hetmem.Config().gradient_clipping is None
    ref, model = pair(seed=8)
    engine = hetmem.initialize(model, {"device": "cpu", "dtype": "fp32"})
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.0)
    for x, y in batches(3):  # several steps: Adam's first step alone does not see a uniform scale
        engine.backward(engine(x, y))
        engine.step()
        # the norm is taken for the non-finite check (README "Reliability") and is above 1,
        # yet the steps are torch's unclipped AdamW steps
        assert engine.last_step.grad_norm > 1.0
        ref(x, y).backward()
        opt.step()
        opt.zero_grad()
    state = engine.state_dict()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-7, msg=key)


def test_add_param_group_trains_parameters_left_out_at_initialize():
    _, model = pair(seed=9, bias=True)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    engine = hetmem.initialize(model, config(), optimizer=torch.optim.AdamW(matrices))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        engine.optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    with pytest.raises(ValueError, match=r"add_param_group.*\['lr'\]=-0.1"):
        engine.optimizer.add_param_group({"params": vectors, "lr": -0.1})
    assert len(engine.optimizer.param_groups) == 1  # the rejected group left nothing behind
    engine.optimizer.add_param_group({"params": vectors, "weight_decay": 0.0})
    before = engine.state_dict()
    x, y = batches(1, seed=14)[0]
    engine.backward(engine(x, y))
    engine.step()
    after = engine.state_dict()
    assert not torch.equal(after["ln_f.bias"], before["ln_f.bias"])
    assert engine.optimizer.param_groups[1]["lr"] == 1e-3  # the defaults of the user's optimizer
