"""The NVMe tier in the training loop: spill past host_budget, train on exactly, lose nothing."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hetmem
from hetmem.chunk_manager.states import Tier
from hetmem.nvme import SwapChecksumError
from tests.engine.helpers import (assert_no_pins, batches, config, max_rel_diff, pair, run_resume_worker,
                                  train_engine, train_plain)

ROOT = Path(__file__).resolve().parents[2]
HOST = "900KiB"  # a third of the model's chunk bytes: most state lives on NVMe


def _engine(tmp_path, **overrides):
    _, model = pair()
    return hetmem.initialize(model, config(device_budget="2304KiB", nvme_dir=str(tmp_path / "swap"),
                                           host_budget=HOST, **overrides))


def test_state_on_nvme_trains_exactly_like_torch(tmp_path):
    ref, model = pair()
    data = batches(8)
    expected = train_plain(ref, data)
    engine = hetmem.initialize(model, config(device_budget="2304KiB", nvme_dir=str(tmp_path / "swap"),
                                             host_budget=HOST))
    got = train_engine(engine, data)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)
    assert max_rel_diff(ref.state_dict(), engine.state_dict()) < 1e-4
    moves = [m for s in engine.recorder.steps for m in s["moves"]]
    assert any(m["dst"] == "nvme" for m in moves) and any(m["src"] == "nvme" for m in moves)
    assert engine.manager.bytes_on(Tier.NVME) > engine.manager.bytes_on(Tier.HOST)
    assert engine.manager.bytes_on(Tier.HOST) <= engine.budgets.host
    assert engine.last_step.io_bytes > 0 and engine.last_step.io_wait_s >= 0
    engine.close()
    assert not list((tmp_path / "swap").iterdir()), "close() must remove the swap files"


def test_host_budget_is_never_exceeded(tmp_path):
    engine = _engine(tmp_path, dtype="bf16")
    seen = []
    original = engine.manager._account

    def checked(tier, chunk, sign):
        original(tier, chunk, sign)
        if tier is Tier.HOST:
            seen.append(engine.manager.bytes_on(Tier.HOST))
            assert engine.manager.bytes_on(Tier.HOST) <= engine.budgets.host

    engine.manager._account = checked
    train_engine(engine, batches(4))
    assert len(seen) > 50
    engine.close()


def test_an_io_error_raises_and_loses_nothing(tmp_path):
    ref, model = pair()
    data = batches(6)
    train_plain(ref, data)  # each batch once, as the engine ends up doing
    engine = hetmem.initialize(model, config(device_budget="2304KiB", nvme_dir=str(tmp_path / "swap"),
                                             host_budget=HOST))
    train_engine(engine, data[:3])
    engine.manager.nvme.swap.file.inject_fault("error", after=2)
    x, y = data[3]
    with pytest.raises(OSError):
        engine.backward(engine(x, y))
        engine.step()
    # the fault fires once; the failed store left its chunk in host memory: retry the step
    loss = engine(x, y)
    engine.backward(loss)
    engine.step()
    assert_no_pins(engine)
    train_engine(engine, data[4:])
    state = engine.state_dict()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-6, msg=key)
    engine.close()


def test_corrupted_swap_is_detected_with_checksums(tmp_path):
    engine = _engine(tmp_path, nvme_checksum=True)
    train_engine(engine, batches(2))
    assert engine.last_step is not None  # the overlapped step applied: nothing pending reads the victim
    spilled = [c for c in engine.manager.chunks if c.tier is Tier.NVME]
    assert spilled
    swap = engine.manager.nvme.swap
    victim = spilled[0]
    blob = swap._blobs[engine.manager.nvme.key(victim)]  # its committed blob (speculation flips them)
    with open(swap.path, "r+b") as f:
        f.seek(blob.offset + 8)
        f.write(b"\xde\xad\xbe\xef")
    with pytest.raises(SwapChecksumError, match=f"{victim.kind.name}#{victim.group.index}"):
        engine.manager.payload_in_memory(victim)
    engine.close()


def test_swap_that_does_not_fit_the_disk_is_refused_before_training(tmp_path, monkeypatch):
    import hetmem.nvme.swap as swap_module

    monkeypatch.setattr(swap_module, "free_bytes", lambda directory: 4096)
    _, model = pair()
    with pytest.raises(OSError, match=r"swap space needs .* but only 4096 B .* are free"):
        hetmem.initialize(model, config(nvme_dir=str(tmp_path / "swap"), host_budget=HOST))
    assert not (tmp_path / "swap" / "hetmem.swap").exists()


def test_host_budget_below_the_pipeline_is_named():
    _, model = pair()
    with pytest.raises(ValueError, match=r"too small for the NVMe pipeline: it keeps 3 chunk groups"):
        hetmem.initialize(model, config(nvme_dir="/tmp/unused-hetmem-swap", host_budget="100KiB"))


def test_stale_swap_of_a_killed_run_is_cleaned_up(tmp_path):
    swap = tmp_path / "swap"
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
            f"import hetmem\nfrom tests.engine.helpers import pair, config, batches, train_engine\n"
            f"e = hetmem.initialize(pair()[1], config(device_budget='2304KiB', nvme_dir={str(swap)!r}, "
            f"host_budget={HOST!r}))\ntrain_engine(e, batches(1))\nprint('ready', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert (swap / "hetmem.swap").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (swap / "hetmem.swap").exists()  # a killed run cannot clean up
    engine = _engine(tmp_path)            # the next run takes the folder over
    train_engine(engine, batches(2))
    engine.close()
    assert not (swap / "hetmem.swap").exists()


def test_checkpoint_streams_nvme_state_without_moving_it(tmp_path):
    engine = _engine(tmp_path)
    train_engine(engine, batches(3))
    assert engine.last_step is not None  # the overlapped step applied (that moves chunks; saving must not)
    engine.manager.wait_all()  # its last write-backs (and speculation's) land: host bytes settle
    where = {c.id: c.tier for c in engine.manager.chunks}
    host_before = engine.manager.bytes_on(Tier.HOST)
    folder = engine.save_checkpoint(tmp_path / "ckpt")
    assert {c.id: c.tier for c in engine.manager.chunks} == where  # nothing was pulled into memory
    assert engine.manager.bytes_on(Tier.HOST) == host_before
    expected = engine.state_dict()
    fresh = _engine(tmp_path / "second")
    fresh.load_checkpoint(folder)
    state = fresh.state_dict()
    for key in expected:
        assert torch.equal(state[key], expected[key]), key
    engine.close()
    fresh.close()


def test_resume_with_state_on_nvme_is_bit_identical(tmp_path):
    ckpt = tmp_path / "ckpt"
    run_resume_worker("train", ckpt, "bf16", 7, 3, tmp_path / "full.json", tmp_path / "swap1")
    # resumed at another chunk size: the checkpoint does not depend on the layout
    run_resume_worker("resume", ckpt, "bf16", 7, 3, tmp_path / "resumed.json", tmp_path / "swap2", 16384)
    full = json.loads((tmp_path / "full.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert list(resumed["losses"]) == ["4", "5", "6", "7"]
    for step, loss in resumed["losses"].items():
        assert loss == full["losses"][step], f"step {step}: {loss!r} != {full['losses'][step]!r}"
    assert resumed["state"] == full["state"]


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_io_error_inside_the_optimizer_step_says_it_is_partly_applied(tmp_path, monkeypatch, overlap):
    import errno

    from hetmem.optimizer import ChunkedAdam

    engine = _engine(tmp_path, overlap_step=overlap, step_speculation=False)  # every group in the pipeline
    train_engine(engine, batches(2))
    assert engine.last_step is not None  # the last overlapped step applied before the fault is armed
    original = ChunkedAdam._step_group
    calls = {"n": 0}

    def failing(self, group, grad_scale):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.EIO, "Input/output error (injected)")
        return original(self, group, grad_scale)

    monkeypatch.setattr(ChunkedAdam, "_step_group", failing)
    x, y = batches(1, seed=7)[0]
    engine.backward(engine(x, y))
    with pytest.raises(OSError, match=r"after updating 2 of \d+ chunk groups .* load the last checkpoint") as info:
        engine.step()
        assert overlap and engine.adam.pending is not None  # overlapped: the next forward applies it
        engine(x, y)
    assert info.value.errno == errno.EIO
    assert engine.step() is (not overlap)  # the rest applied; an overlapped step counted already
    assert engine.adam.pending is None and calls["n"] == len(engine.adam.layout.groups) + 1
    engine.close()
