"""CPUAdam / CPUAdamW as drop-ins for torch.optim.Adam / AdamW."""
from __future__ import annotations

import copy

import pytest
import torch

from hetmem.optim import CPUAdam, CPUAdamW

PAIRS = [(CPUAdam, torch.optim.Adam), (CPUAdamW, torch.optim.AdamW)]
IDS = ["adam", "adamw"]


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(17, 33), torch.nn.GELU(), torch.nn.Linear(33, 7),
                               torch.nn.LayerNorm(7))


def groups(model: torch.nn.Module) -> list[dict]:
    """Three groups with different hyperparameters (and LayerNorm's parameters unused below)."""
    return [
        {"params": model[0].parameters(), "weight_decay": 0.1},
        {"params": model[2].parameters(), "lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-3},
        {"params": model[3].parameters(), "lr": 5e-2, "weight_decay": 0.0},
    ]


def train(model, opt, steps: int, seed: int, skip_layernorm: bool = False, followers=()) -> list[float]:
    """Train `model` with `opt`; each (model, optimizer) in `followers` takes a step with the
    same gradients (copied from `model`), so that the optimizers are compared on equal input
    rather than through two chaotic training runs that amplify each other's last bits."""
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 17, generator=gen)
        opt.zero_grad()
        y = model(x) if not skip_layernorm else model[:3](x)
        loss = y.pow(2).mean()
        loss.backward()
        for follower, follower_opt in followers:
            for p, q in zip(model.parameters(), follower.parameters()):
                q.grad = None if p.grad is None else p.grad.clone()
            follower_opt.step()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_models_close(a: torch.nn.Module, b: torch.nn.Module) -> None:
    # rtol 1e-6 plus one fp32 ulp at each tensor's magnitude (see tests/ops/test_adam_kernel.py)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        atol = torch.finfo(torch.float32).eps * pb.detach().abs().max().item()
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=IDS)
def test_same_updates_as_torch(ours, theirs):
    model, ref = make_model(), make_model()
    opt, ref_opt = ours(groups(model), lr=1e-2), theirs(groups(ref), lr=1e-2)
    train(ref, ref_opt, 12, seed=1, followers=[(model, opt)])
    assert_models_close(model, ref)
    for p, q in zip(model.parameters(), ref.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            expected = ref_opt.state[q][key]
            atol = torch.finfo(torch.float32).eps * expected.abs().max().item()
            torch.testing.assert_close(opt.state[p][key], expected, rtol=1e-6, atol=atol)
        step = opt.state[p]["step"]
        assert torch.is_tensor(step) and step.dtype == torch.float32 and step.item() == 12


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=IDS)
def test_independent_training_follows_torch(ours, theirs):
    model, ref = make_model(), make_model()
    losses = train(model, ours(groups(model), lr=1e-2), 12, seed=1)
    ref_losses = train(ref, theirs(groups(ref), lr=1e-2), 12, seed=1)
    # Each run feeds its own weights' gradients back, so last-bit differences grow a little.
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=0)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=IDS)
def test_params_without_grad_are_skipped(ours, theirs):
    model, ref = make_model(), make_model()
    opt, ref_opt = ours(groups(model), lr=1e-2), theirs(groups(ref), lr=1e-2)
    before = copy.deepcopy(model[3].state_dict())
    train(ref, ref_opt, 3, seed=2, skip_layernorm=True, followers=[(model, opt)])
    for name, value in model[3].state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p not in opt.state for p in model[3].parameters())
    assert_models_close(model, ref)


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=IDS)
@pytest.mark.parametrize("direction", ["hetmem_to_torch", "torch_to_hetmem"])
def test_state_dict_round_trip_continues_identically(ours, theirs, direction):
    a, b = make_model(), make_model()
    first, second = (ours, theirs) if direction == "hetmem_to_torch" else (theirs, ours)
    opt_a = first(groups(a), lr=1e-2)
    train(a, opt_a, 5, seed=3)
    # b takes over a's weights and optimizer state, in the other implementation
    b.load_state_dict(a.state_dict())
    opt_b = second(groups(b), lr=1e-2)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for p in b.parameters():
        assert opt_b.state[p]["step"].item() == 5
    train(a, opt_a, 5, seed=4, followers=[(b, opt_b)])
    assert_models_close(b, a)
    # and back again: the second implementation's state dict loads into the first
    opt_c = first(groups(b), lr=1e-2)
    opt_c.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    for p in b.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_c.state[p][key], opt_b.state[p][key])


def test_cpu_adamw_loads_adam_state_as_adamw():
    model = make_model()
    adam_opt = torch.optim.Adam(groups(model), lr=1e-2)
    train(model, adam_opt, 2, seed=5)
    opt = CPUAdamW(groups(model), lr=1e-2)
    opt.load_state_dict(adam_opt.state_dict())
    assert all(group["decoupled_weight_decay"] for group in opt.param_groups)
    assert all(group["bias_correction"] for group in opt.param_groups)


@pytest.mark.parametrize("option,value", [("amsgrad", True), ("maximize", True), ("capturable", True),
                                          ("differentiable", True)])
def test_unsupported_torch_options_in_a_loaded_state_dict(option, value):
    model = make_model()
    state = torch.optim.Adam(groups(model), lr=1e-2).state_dict()
    state["param_groups"][1][option] = value
    opt = CPUAdam(groups(model), lr=1e-2)
    with pytest.raises(ValueError, match=f"param group 1 of the loaded state dict sets {option}=True, which "
                                         f"hetmem's CPU Adam does not implement"):
        opt.load_state_dict(state)


def test_bad_parameters_and_hyperparameters_named():
    with pytest.raises(ValueError, match=r"CPUAdam: parameter 1 of param group 0 must be an fp32 CPU tensor, "
                                         r"found torch.float64 on cpu"):
        CPUAdam([torch.zeros(3, requires_grad=True), torch.zeros(3, dtype=torch.float64, requires_grad=True)])
    with pytest.raises(ValueError, match=r"CPUAdamW: parameter 0 of param group 1 \(shape \(3, 4\)\) must be "
                                         r"contiguous, found strides \(1, 3\)"):
        CPUAdamW([{"params": [torch.zeros(3)]}, {"params": [torch.zeros(4, 3).t()]}])
    with pytest.raises(ValueError, match=r"CPUAdam: betas\[1\] must be in \[0, 1\), found 1.0"):
        CPUAdam([torch.zeros(3)], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"CPUAdam param group 1: lr must be >= 0, found -1"):
        CPUAdam([{"params": [torch.zeros(3)]}, {"params": [torch.zeros(3)], "lr": -1}])
    p = torch.zeros(4, 3, requires_grad=True)
    opt = CPUAdam([p])
    p.grad = torch.zeros(3, 4).t()
    with pytest.raises(ValueError, match=r"the gradient of parameter 0 in param group 0 must be a dense, contiguous"):
        opt.step()


def test_closure_and_16bit_grads():
    p = torch.randn(10, requires_grad=True)
    opt = CPUAdamW([p], lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    before = p.detach().clone()
    loss = opt.step(closure)
    torch.testing.assert_close(loss, (before * before).sum())
    assert not torch.equal(p.detach(), before)
    # a bf16 gradient is read as it is: the same update as its fp32 value
    q = torch.randn(10, requires_grad=True)
    r = q.detach().clone().requires_grad_()
    q.grad_dtype = None  # torch would otherwise refuse a bf16 grad on an fp32 parameter
    oq, orr = CPUAdam([q], lr=1e-2), CPUAdam([r], lr=1e-2)
    g = torch.randn(10).bfloat16()
    q.grad, r.grad = g, g.float()
    oq.step()
    orr.step()
    assert torch.equal(q, r)
