"""Checkpoints: bit-exact resume in a fresh process, atomic writes, corruption caught, export."""
from __future__ import annotations

import json

import pytest
import torch

import hetmem
from hetmem.checkpoint import CheckpointError
from tests.engine.helpers import batches, config, pair, run_resume_worker, tiny_gpt, train_engine


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


def _trained(tmp_path, steps=3, **overrides):
    _, model = pair()
    engine = hetmem.initialize(model, config(device_budget="2304KiB", **overrides))
    train_engine(engine, batches(steps))
    return engine


def test_crash_mid_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    engine = _trained(tmp_path)
    ckpt = tmp_path / "ckpt"
    first = engine.save_checkpoint(ckpt)
    assert (ckpt / "latest").read_text() == first.name
    train_engine(engine, batches(1, seed=5))
    import hetmem.checkpoint as ck

    calls = {"n": 0}
    original = ck._as_bytes

    def dying(tensor):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device (simulated)")
        return original(tensor)

    monkeypatch.setattr(ck, "_as_bytes", dying)
    with pytest.raises(OSError, match="No space left"):
        engine.save_checkpoint(ckpt)
    monkeypatch.setattr(ck, "_as_bytes", original)
    assert (ckpt / "latest").read_text() == first.name
    fresh = hetmem.initialize(pair()[1], config(device_budget="2304KiB"))
    fresh.load_checkpoint(ckpt)
    assert fresh.global_step == 3
    second = engine.save_checkpoint(ckpt, keep=1)  # a later save cleans up and prunes
    assert (ckpt / "latest").read_text() == second.name
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", second.name]  # no leftovers


def test_corruption_and_mismatch_are_named(tmp_path):
    engine = _trained(tmp_path)
    folder = engine.save_checkpoint(tmp_path / "ckpt")
    with open(folder / "chunks.bin", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    fresh = hetmem.initialize(pair()[1], config())
    with pytest.raises(CheckpointError, match=r"chunks.bin: chunk PARAM#0 .* fails its CRC32 check"):
        fresh.load_checkpoint(tmp_path / "ckpt")
    other = hetmem.initialize(tiny_gpt(d_model=32), config())
    good = _trained(tmp_path).save_checkpoint(tmp_path / "ckpt2")
    with pytest.raises(CheckpointError, match="another model or chunk layout"):
        other.load_checkpoint(good)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        fresh.load_checkpoint(tmp_path)
    bf16 = hetmem.initialize(pair()[1], config(dtype="bf16"))
    with pytest.raises(CheckpointError, match="saved with dtype='fp32'"):
        bf16.load_checkpoint(good)


def test_save_refused_between_backward_and_step(tmp_path):
    engine = _trained(tmp_path, dtype="bf16")
    x, y = batches(1)[0]
    engine.backward(engine(x, y))
    with pytest.raises(RuntimeError, match="between engine.backward\\(\\) and engine.step\\(\\)"):
        engine.save_checkpoint(tmp_path / "c")
    engine.step()
    engine.save_checkpoint(tmp_path / "c")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_export_safetensors_loads_into_the_plain_model(tmp_path, dtype):
    safetensors = pytest.importorskip("safetensors.torch")
    engine = _trained(tmp_path, dtype=dtype)
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
