"""Checkpoints: bit-exact resume in a fresh process and under any other layout, fp32 <-> bf16,
optimizer groups and schedulers, mismatches named, export."""
from __future__ import annotations

import json

import pytest
import torch

import hetmem
from hetmem.checkpoint import CheckpointError
from hetmem.chunk_manager.states import Tier
from tests.engine.checkpoint_state import assert_same_state, training_state
from tests.engine.helpers import batches, config, pair, run_resume_worker, tiny_gpt, train_engine

TIGHT = "2304KiB"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path, dtype):
    ckpt = tmp_path / "ckpt"
    run_resume_worker("train", ckpt, dtype, 8, 4, tmp_path / "full.json")
    run_resume_worker("resume", ckpt, dtype, 8, 4, tmp_path / "resumed.json")
    full = json.loads((tmp_path / "full.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert list(resumed["losses"]) == ["5", "6", "7", "8"]
    for step, loss in resumed["losses"].items():
        assert loss == full["losses"][step], f"step {step}: {loss!r} != {full['losses'][step]!r}"
    assert resumed["state"] == full["state"]


def _layout(name: str, tmp_path) -> dict:
    return {
        "tight-8192": dict(device_budget="3MiB", chunk_size=8192),
        "auto-8MiB": dict(device_budget="8MiB", chunk_size="auto"),
        "nvme-8192": dict(device_budget="3MiB", chunk_size=8192, nvme_dir=str(tmp_path / f"swap-{name}"),
                          host_budget="900KiB"),
        "nvme-16384": dict(device_budget="3MiB", chunk_size=16384, nvme_dir=str(tmp_path / f"swap-{name}"),
                           host_budget="1500KiB"),
    }[name]


def _moved(engine, layout: str) -> bool:
    moves = [m for s in engine.recorder.steps for m in s["moves"]]
    if layout.startswith("nvme"):
        return any(m["dst"] == "nvme" for m in moves) and engine.manager.bytes_on(Tier.NVME) > 0
    return any(m["src"] == "device" or m["dst"] == "device" for m in moves) if layout == "tight-8192" else True


@pytest.mark.parametrize("dtype,saved_at,loaded_at,clip", [
    ("fp32", "tight-8192", "auto-8MiB", None),
    ("bf16", "nvme-8192", "auto-8MiB", 0.5),
    ("fp32", "auto-8MiB", "nvme-16384", 0.5),
    ("fp16", "tight-8192", "nvme-16384", None),   # the loss scale and its counters resume too
])
def test_resume_under_another_layout_is_bit_identical(tmp_path, dtype, saved_at, loaded_at, clip):
    """Save at one chunk size / budget / tier placement, load in a fresh engine at another, train on:
    losses, weights, Adam moments and step counts equal the uninterrupted run's bit for bit."""
    data = batches(5, seed=2)
    overrides = dict(dtype=dtype, gradient_clipping=clip)
    torch.manual_seed(7)
    first = hetmem.initialize(tiny_gpt(dropout=0.1), config(**_layout(saved_at, tmp_path), **overrides))
    train_engine(first, data[:3])
    first.save_checkpoint(tmp_path / "ckpt")
    expected_losses = train_engine(first, data[3:])
    expected = training_state(first)
    second = hetmem.initialize(tiny_gpt(seed=1, dropout=0.1), config(**_layout(loaded_at, tmp_path), **overrides))
    assert second.layout.chunk_elements != first.layout.chunk_elements or saved_at.startswith("nvme") != \
        loaded_at.startswith("nvme")
    second.load_checkpoint(tmp_path / "ckpt")
    assert train_engine(second, data[3:]) == expected_losses
    assert_same_state(training_state(second), expected)
    assert _moved(first, saved_at) and _moved(second, loaded_at)
    first.close()
    second.close()


def _frozen_ln(model):
    model.ln_f.weight.requires_grad_(False)
    model.ln_f.bias.requires_grad_(False)
    return model


def _saved_and_loaded(tmp_path, saved_dtype: str, loaded_dtype: str):
    """Train 2 steps in one dtype, save, load into the other at another chunk size: (saved state,
    loaded state, the loading engine); ln_f is frozen."""
    source = hetmem.initialize(_frozen_ln(pair()[1]), config(dtype=saved_dtype, device_budget=TIGHT))
    train_engine(source, batches(2))
    source.save_checkpoint(tmp_path / "ckpt")
    target = hetmem.initialize(_frozen_ln(tiny_gpt(seed=3)), config(dtype=loaded_dtype, chunk_size=16384))
    target.load_checkpoint(tmp_path / "ckpt")
    return training_state(source), training_state(target), target


def test_bf16_checkpoint_resumes_in_fp32_from_its_master(tmp_path):
    saved, got, fp32 = _saved_and_loaded(tmp_path, "bf16", "fp32")
    for slot in fp32.layout.slots:
        if slot.trainable:
            assert torch.equal(got[(slot.name, "PARAM")], saved[(slot.name, "MASTER")]), slot.name
            for kind in ("EXP_AVG", "EXP_AVG_SQ", "step"):
                assert torch.equal(torch.as_tensor(got[(slot.name, kind)]), torch.as_tensor(saved[(slot.name, kind)]))
        else:  # frozen: saved in bf16, widened
            assert torch.equal(got[(slot.name, "PARAM")], saved[(slot.name, "PARAM")].float()), slot.name
    assert got["counters"] == saved["counters"]
    train_engine(fp32, batches(1, seed=4))


def test_fp32_checkpoint_resumes_in_bf16_with_master_equal_to_the_weights(tmp_path):
    saved, got, bf16 = _saved_and_loaded(tmp_path, "fp32", "bf16")
    for slot in bf16.layout.slots:
        weights = saved[(slot.name, "PARAM")]
        assert torch.equal(got[(slot.name, "PARAM")], weights.to(torch.bfloat16)), slot.name
        if slot.trainable:
            assert torch.equal(got[(slot.name, "MASTER")], weights), slot.name
            assert torch.equal(got[(slot.name, "EXP_AVG_SQ")], saved[(slot.name, "EXP_AVG_SQ")])
            assert got[(slot.name, "step")] == saved[(slot.name, "step")] == 2
    train_engine(bf16, batches(1, seed=4))


def test_bf16_weights_are_the_master_rounded_after_training(tmp_path):
    """What loading into bf16 relies on: the optimizer's bf16 weights are its master rounded to
    nearest even, as torch rounds."""
    engine = hetmem.initialize(pair()[1], config(dtype="bf16", device_budget=TIGHT))
    train_engine(engine, batches(3))
    state = training_state(engine)
    for slot in engine.layout.slots:
        assert torch.equal(state[(slot.name, "PARAM")], state[(slot.name, "MASTER")].to(torch.bfloat16)), slot.name


def test_optimizer_groups_and_lr_scheduler_round_trip(tmp_path):
    engine = hetmem.initialize(pair()[1], config())
    train_engine(engine, batches(1))
    assert engine.save_checkpoint(tmp_path / "plain").is_dir()   # config.optimizer's one group, no scheduler
    slots = engine.layout.slots
    engine.optimizer.param_groups = [{"params": [s.param for s in slots[:4]], "lr": 3e-4, "betas": (0.8, 0.95),
                                      "amsgrad": False, "name": "decay", "maximize": None},
                                     {"params": [s.param for s in slots[4:]], "lr": 1e-3, "betas": (0.9, 0.999),
                                      "fn": print}]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.9 ** step)
    for _ in range(3):
        opt.step()
        sched.step()
    engine.save_checkpoint(tmp_path / "ckpt", lr_scheduler=sched)
    saved_sched = sched.state_dict()
    fresh = hetmem.initialize(pair()[1], config())
    fresh_slots = fresh.layout.slots
    fresh.optimizer.param_groups = [{"params": [s.param for s in fresh_slots[:4]], "lr": 0.0, "betas": (0.0, 0.0),
                                     "amsgrad": True},
                                    {"params": [s.param for s in fresh_slots[4:]], "lr": 0.0, "betas": (0.0, 0.0),
                                     "fn": None}]
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda step: 0.9 ** step)
    fresh.load_checkpoint(tmp_path / "ckpt", lr_scheduler=sched2)
    first, second = fresh.optimizer.param_groups
    assert (first["lr"], first["betas"], first["amsgrad"], first["name"], first["maximize"]) == \
        (3e-4, (0.8, 0.95), False, "decay", None)
    assert (second["lr"], second["betas"], second["fn"]) == (1e-3, (0.9, 0.999), None)  # a function is not stored
    assert sched2.state_dict() == saved_sched and sched2.last_epoch == 3
    train_engine(fresh, batches(1, seed=1))   # the live state now differs from the checkpoint
    two_groups = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                                  {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=0.5)
    other = torch.optim.lr_scheduler.LambdaLR(two_groups, [lambda step: 1.0, lambda step: 0.5])
    before, other_before = training_state(fresh), other.state_dict()
    with pytest.raises(CheckpointError, match=r"lr_scheduler.pt holds a scheduler over 1 param groups \('base_lrs'\), "
                                              r"this LambdaLR has 2"):
        fresh.load_checkpoint(tmp_path / "ckpt", lr_scheduler=other)
    step_lr = torch.optim.lr_scheduler.StepLR(opt2, step_size=2)
    with pytest.raises(CheckpointError, match=r"holds a scheduler state with keys .*, this StepLR has"):
        fresh.load_checkpoint(tmp_path / "ckpt", lr_scheduler=step_lr)
    assert other.state_dict() == other_before and len(other.lr_lambdas) == 2
    assert_same_state(training_state(fresh), before)
    first["params"], second["params"] = first["params"][:3], first["params"][3:] + second["params"]
    with pytest.raises(CheckpointError, match=r"param_groups\[0\] held 4 parameters \(wte.weight, wpe.weight, "
                                              r"blocks.0.ln1.weight, ...\) when saved and holds 3 here"):
        fresh.load_checkpoint(tmp_path / "ckpt")
    fresh.optimizer.param_groups = fresh.optimizer.param_groups[:1]
    with pytest.raises(CheckpointError, match="holds 2 optimizer param_groups, this engine's optimizer has 1"):
        fresh.load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="holds no lr_scheduler state"):
        hetmem.initialize(pair()[1], config()).load_checkpoint(tmp_path / "plain", lr_scheduler=sched2)


def test_mismatches_are_named(tmp_path):
    good = hetmem.initialize(pair()[1], config())
    train_engine(good, batches(1))
    folder = good.save_checkpoint(tmp_path / "ckpt")
    other = hetmem.initialize(tiny_gpt(d_model=32), config())
    with pytest.raises(CheckpointError, match=r"does not fit this model: parameter 'wte.weight' has shape "
                                              r"\(256, 64\) there, \(256, 32\) here"):
        other.load_checkpoint(folder)
    frozen = hetmem.initialize(_frozen_ln(tiny_gpt()), config())
    with pytest.raises(CheckpointError, match="parameter 'ln_f.weight' is trainable there but frozen here"):
        frozen.load_checkpoint(folder)
    deeper = hetmem.initialize(tiny_gpt(n_layer=4), config())
    with pytest.raises(CheckpointError, match="parameter 'blocks.3.ln1.weight' is not in the checkpoint"):
        deeper.load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        good.load_checkpoint(tmp_path)
    accumulating = hetmem.initialize(pair()[1], config(gradient_accumulation_steps=2))
    train_engine(good, batches(2))
    with pytest.raises(CheckpointError, match="micro-step 3, which is not a boundary of gradient_accumulation_steps=2"):
        accumulating.load_checkpoint(good.save_checkpoint(tmp_path / "odd"))
    old = tmp_path / "v1"
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({"format": "hetmem-checkpoint", "version": 1, "chunks": []}))
    with pytest.raises(CheckpointError, match=r"format version 1 checkpoint \(chunk layout dependent\), which is "
                                              r"no longer read"):
        good.load_checkpoint(old)


def test_save_refused_between_backward_and_step(tmp_path):
    engine = hetmem.initialize(pair()[1], config(dtype="bf16", device_budget=TIGHT))
    train_engine(engine, batches(2))
    x, y = batches(1)[0]
    engine.backward(engine(x, y))
    with pytest.raises(RuntimeError, match="between engine.backward\\(\\) and engine.step\\(\\)"):
        engine.save_checkpoint(tmp_path / "c")
    assert not (tmp_path / "c").exists()
    engine.step()
    engine.save_checkpoint(tmp_path / "c")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_export_safetensors_loads_into_the_plain_model(tmp_path, dtype):
    safetensors = pytest.importorskip("safetensors.torch")
    engine = hetmem.initialize(pair()[1], config(dtype=dtype, device_budget=TIGHT))
    train_engine(engine, batches(3))
    folder = engine.save_checkpoint(tmp_path / "ckpt")
    from hetmem.cli import main

    assert main(["export", str(tmp_path / "ckpt"), "--to", str(tmp_path / "model.safetensors")]) == 0
    weights = safetensors.load_file(tmp_path / "model.safetensors")
    expected = engine.state_dict()
    assert list(weights) == list(expected)
    for key in expected:
        assert torch.equal(weights[key], expected[key]), key
    plain = tiny_gpt()
    plain.load_state_dict(weights)  # strict: every key, every shape
    x, y = batches(1)[0]
    if dtype == "fp32":
        torch.testing.assert_close(plain(x, y), engine(x, y), rtol=1e-6, atol=0)
    assert folder.name == "step-00000003"
