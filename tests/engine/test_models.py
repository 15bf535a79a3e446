"""Models as users write them: tied weights, reuse, frozen and unused parameters, buffers,
no_grad/eval forwards, activation checkpointing, meta-device construction."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import hetmem
from hetmem.chunk_manager.states import TensorState
from hetmem.models.gpt import GPT
from tests.engine.helpers import assert_no_pins, batches, config, pair, tiny_config


def _assert_same_weights(engine, reference: nn.Module, rtol=1e-5, atol=1e-7):
    state = engine.state_dict()
    expected = reference.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=rtol, atol=atol, msg=key)


def _train_both(make_model, data, step_fn=None, **engine_config):
    torch.manual_seed(0)
    ref = make_model()
    model = copy.deepcopy(ref)
    step_fn = step_fn or (lambda m, x, y: m(x, y))
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    engine = hetmem.initialize(model, config(**engine_config))
    for x, y in data:
        loss = step_fn(ref, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        got = step_fn(engine, x, y)
        engine.backward(got)
        engine.step()
        assert_no_pins(engine)
        torch.testing.assert_close(got, loss, rtol=1e-5, atol=0)
    return ref, engine


def test_tied_weights_share_one_slot_and_train_as_in_torch():
    ref, engine = _train_both(lambda: GPT(tiny_config()), batches(6), device_budget="2304KiB")
    slot = engine.layout.by_name["wte.weight"]
    assert engine.layout.by_name["head.weight"] is slot
    assert slot.aliases == ["wte.weight", "head.weight"]
    state = engine.state_dict()
    assert torch.equal(state["wte.weight"], state["head.weight"])
    _assert_same_weights(engine, ref)


class Twice(nn.Module):
    """One Linear used twice in a forward, and a parameter-owning parent."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 32)
        self.shared = nn.Linear(32, 32)
        self.scale = nn.Parameter(torch.ones(32))
        self.head = nn.Linear(32, 256)

    def forward(self, x, y):
        h = self.emb(x)
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h)) * self.scale
        return nn.functional.cross_entropy(self.head(h).view(-1, 256), y.view(-1))


def test_module_called_twice_and_parent_parameters():
    ref, engine = _train_both(Twice, batches(6), chunk_size=4096)
    _assert_same_weights(engine, ref)
    assert engine.scheduler.late_fetches == 0


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int = 4):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.base.bias.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(rank, base.in_features) * 0.01)
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + x @ self.a.t() @ self.b.t()


def _lora_gpt():
    model = GPT(tiny_config())
    for block in model.blocks:
        block.mlp.fc = LoRALinear(block.mlp.fc)
    model.wte.weight.requires_grad_(False)
    return model


def test_frozen_base_with_lora_adapters():
    ref, engine = _train_both(_lora_gpt, batches(5), device_budget="2304KiB")
    _assert_same_weights(engine, ref)
    frozen = [g for g in engine.layout.groups if not g.trainable]
    assert frozen and all(len(g.chunks) == 1 for g in frozen)  # PARAM only: no optimizer state
    assert engine.layout.by_name["blocks.0.mlp.fc.base.weight"].step == 0


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 16)
        self.used = nn.Linear(16, 256)
        self.unused = nn.Linear(16, 16)
        self.sometimes = nn.Linear(16, 16)

    def forward(self, x, y, use_sometimes=False):
        h = self.emb(x)
        if use_sometimes:
            h = self.sometimes(h)
        return nn.functional.cross_entropy(self.used(h).view(-1, 256), y.view(-1))


def test_unused_parameters_are_not_updated_like_torch():
    data = batches(6)
    flags = [False, True, False, False, True, False]
    torch.manual_seed(0)
    ref = WithUnused()
    model = copy.deepcopy(ref)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    engine = hetmem.initialize(model, config(chunk_size=4096, optimizer=dict(lr=1e-2, weight_decay=0.1)))
    for (x, y), flag in zip(data, flags):
        ref(x, y, flag).backward()
        opt.step()
        opt.zero_grad()
        engine.backward(engine(x, y, use_sometimes=flag))
        engine.step()
    _assert_same_weights(engine, ref)
    assert engine.layout.by_name["unused.weight"].step == 0
    assert engine.layout.by_name["sometimes.weight"].step == 2
    assert torch.equal(engine.state_dict()["unused.weight"], ref.unused.weight.detach())


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 16)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 256)

    def forward(self, x, y):
        h = self.norm(self.emb(x).transpose(1, 2)).transpose(1, 2)
        return nn.functional.cross_entropy(self.head(h).reshape(-1, 256), y.reshape(-1))


def test_buffers_update_and_come_back_in_state_dict():
    ref, engine = _train_both(WithBatchNorm, batches(4), chunk_size=4096)
    _assert_same_weights(engine, ref)
    assert engine.state_dict()["norm.num_batches_tracked"].item() == 4


def test_no_grad_and_eval_forwards_between_steps():
    ref, model = pair()
    data = batches(6)
    probe_x, probe_y = batches(1, seed=9)[0]
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    engine = hetmem.initialize(model, config(device_budget="2304KiB"))
    for x, y in data:
        ref(x, y).backward()
        opt.step()
        opt.zero_grad()
        engine.backward(engine(x, y))
        engine.step()
        ref.eval()
        engine.eval()
        with torch.no_grad():
            expected = ref(probe_x, probe_y)
            got = engine(probe_x, probe_y)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
        ref.train()
        engine.train()
    _assert_same_weights(engine, ref)
    # the no_grad forwards were not mistaken for a new schedule
    assert engine.tracer.warmups == 1


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.gpt = GPT(tiny_config())

    def forward(self, x, y):
        g = self.gpt
        h = g.wte(x) + g.wpe(torch.arange(x.shape[1]))
        for block in g.blocks:
            h = checkpoint(block, h, use_reentrant=self.reentrant)
        logits = g.head(g.ln_f(h))
        return nn.functional.cross_entropy(logits.float().view(-1, 256), y.view(-1))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    ref, engine = _train_both(lambda: Checkpointed(reentrant), batches(5), device_budget="1280KiB")
    _assert_same_weights(engine, ref)
    assert engine.scheduler.peak_total <= engine.budgets.device


def test_meta_device_model_is_materialised_module_by_module():
    cfg = tiny_config()
    torch.manual_seed(123)
    eager = GPT(cfg)
    with torch.device("meta"):
        lazy = GPT(cfg)
    assert all(p.is_meta for p in lazy.parameters())

    values = {name: p.detach().clone() for name, p in eager.named_parameters()}
    names = {}
    for module_name, module in lazy.named_modules():
        names[module] = module_name

    def init_fn(module):  # copy the eager model's values, as a checkpoint loader would
        prefix = names[module]
        for pname, param in module.named_parameters(recurse=False):
            key = f"{prefix}.{pname}" if prefix else pname
            param.data.copy_(values[key])

    engine = hetmem.initialize(lazy, config(), init_fn=init_fn)
    state = engine.state_dict()
    for key, value in eager.state_dict().items():
        assert torch.equal(state[key], value), key
    assert engine.layout.by_name["head.weight"] is engine.layout.by_name["wte.weight"]
    x, y = batches(1)[0]
    torch.testing.assert_close(engine(x, y), eager(x, y), rtol=1e-6, atol=0)


def test_meta_device_with_reset_parameters_default():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    engine = hetmem.initialize(model, config(chunk_size=4096))
    state = engine.state_dict()
    assert torch.equal(state["1.weight"], torch.ones(8))
    assert state["0.weight"].abs().sum() > 0


def test_meta_module_without_init_names_it():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(4))

    with torch.device("meta"):
        model = nn.Sequential(Custom())
    with pytest.raises(ValueError, match=r"module '0' \(Custom\) is on the meta device \(w\).*init_fn"):
        hetmem.initialize(model, config(chunk_size=4096))


def test_state_dict_round_trip_and_strictness():
    _, model = pair()
    engine = hetmem.initialize(model, config())
    state = engine.state_dict()
    changed = {k: v + 1 for k, v in state.items()}
    engine.load_state_dict(changed)
    again = engine.state_dict()
    for key in state:
        torch.testing.assert_close(again[key], changed[key])
    with pytest.raises(RuntimeError, match="missing keys: ln_f.weight"):
        engine.load_state_dict({k: v for k, v in state.items() if k != "ln_f.weight"})
    with pytest.raises(ValueError, match=r"size mismatch for wpe.weight"):
        engine.load_state_dict({**state, "wpe.weight": torch.zeros(3, 3)})


def test_forward_between_backward_and_step_is_refused_clearly():
    _, model = pair()
    engine = hetmem.initialize(model, config(dtype="bf16"))
    data = batches(3)
    for x, y in data[:2]:  # a warm-up step, then in-slot gradients
        engine.backward(engine(x, y))
        engine.step()
    x, y = data[2]
    engine.backward(engine(x, y))
    assert any(s.state is TensorState.GRAD_IN_SLOT for s in engine.layout.slots)
    with pytest.raises(RuntimeError, match="holds its gradient until engine.step"):
        with torch.no_grad():
            engine(x, y)
    engine.step()  # the engine is still usable afterwards
    engine.backward(engine(x, y))
    engine.step()


class LateUse(nn.Module):
    """With extra=True the Linear's weight is also used, detached, before the Linear: its value
    is needed in backward after the Linear's gradient has arrived (a use warm-up never saw)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 32)
        self.lin = nn.Linear(32, 32)
        self.head = nn.Linear(32, 256)

    def forward(self, x, y, extra=False):
        e = self.emb(x)
        if extra:
            e = torch.tanh(e @ self.lin.weight.detach())
        h = torch.tanh(self.lin(e))
        return nn.functional.cross_entropy(self.head(h).float().reshape(-1, 256), y.reshape(-1))


def test_weight_needed_after_its_gradient_took_its_slot_is_rebuilt_from_master(monkeypatch):
    data = batches(5)
    flags = [False, False, True, True, False]

    def run(in_slot: bool):
        torch.manual_seed(0)
        engine = hetmem.initialize(LateUse(), config(dtype="bf16", chunk_size=4096))
        if not in_slot:
            monkeypatch.setattr(engine.grads, "decide_in_slot", lambda: 0)
        losses = []
        for (x, y), flag in zip(data, flags):
            loss = engine(x, y, extra=flag)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        return engine, losses

    in_slot_engine, in_slot = run(True)
    assert any(g.grad_in_slot for g in in_slot_engine.layout.groups)
    reference_engine, reference = run(False)
    assert in_slot == reference
    expected = reference_engine.state_dict()
    for key, value in in_slot_engine.state_dict().items():
        assert torch.equal(value, expected[key]), key
