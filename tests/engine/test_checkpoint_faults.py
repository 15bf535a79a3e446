"""Checkpoint faults: a crash at every step of a save, corrupted / truncated / missing files,
a full disk, and client states that would need pickled code."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import hetmem
from hetmem.checkpoint import CRASH_ENV, CRASH_EXIT_CODE, CRASH_POINTS, CheckpointError
from hetmem.checkpoint.files import CURRENT
from hetmem.checkpoint.format import encode_meta, read_meta, resolve
from tests.engine.checkpoint_state import BatchNormNet, assert_same_state, bn_batches, training_state
from tests.engine.helpers import train_engine


def _bn_engine(seed: int = 0, **overrides):
    base = dict(device="cpu", device_budget="4MiB", dtype="fp32", chunk_size=4096, gradient_clipping=None,
                optimizer=dict(lr=1e-2, weight_decay=0.1))
    base.update(overrides)
    return hetmem.initialize(BatchNormNet(seed), base)


def _leftovers(root: Path) -> list[str]:
    """Anything of an interrupted save: dot entries at the root, and in each tag folder what is
    neither CURRENT nor the version it names."""
    found = [p.name for p in root.iterdir() if p.name.startswith(".")]
    for tag in root.iterdir():
        if tag.is_dir() and not tag.name.startswith("."):
            current = (tag / CURRENT).read_text() if (tag / CURRENT).exists() else None
            found += [f"{tag.name}/{p.name}" for p in tag.iterdir() if p.name not in (CURRENT, current)]
    return sorted(found)


def _save_in_a_child_that_crashes(engine, root: Path, point: str, tag: str, keep) -> int:
    """Fork; the child saves with the crash point armed and exits there (os._exit); its exit code."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.environ[CRASH_ENV] = point
            engine.save_checkpoint(root, tag=tag, keep=keep)
            code = 0
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the saving child hung at crash point {point}")


@pytest.fixture
def crash_setup(tmp_path):
    """A root with tags 'old' and 'step-00000003' (latest) and an engine one step further."""
    engine = _bn_engine()
    data = bn_batches(4)
    train_engine(engine, data[:2])
    template = tmp_path / "template"
    engine.save_checkpoint(template, tag="old")
    train_engine(engine, data[2:3])
    engine.save_checkpoint(template)
    before = training_state(engine)
    train_engine(engine, data[3:])
    after = training_state(engine)
    return engine, template, before, after, _bn_engine(seed=1)


@pytest.mark.parametrize("same_tag", [True, False], ids=["same-tag", "new-tag"])
def test_a_crash_at_every_step_of_a_save_loses_nothing(tmp_path, crash_setup, same_tag):
    """For each crash point: the child dies there; the latest checkpoint loads whole (the old
    state before the pointers moved, the new one after); the next load or save removes what
    the dead save left, and the next save succeeds."""
    engine, template, before, after, fresh = crash_setup
    tag = "step-00000003" if same_tag else "step-00000004"
    switch = CRASH_POINTS.index("current_replaced" if same_tag else "latest_replaced")
    points = CRASH_POINTS if same_tag else CRASH_POINTS[:CRASH_POINTS.index("latest_replaced") + 1]
    for i, point in enumerate(points):
        expected = after if i >= switch else before
        for cleaner in ("load", "save"):
            root = tmp_path / f"{point}-{cleaner}"
            shutil.copytree(template, root)
            code = _save_in_a_child_that_crashes(engine, root, point, tag, keep=1)
            assert code == CRASH_EXIT_CODE, f"crash point {point} was not reached (exit code {code})"
            if cleaner == "load":
                fresh.load_checkpoint(root)
                assert_same_state(training_state(fresh), expected, skip=("torch_rng",))
                assert _leftovers(root) == [], point
            else:
                engine.save_checkpoint(root, tag=tag, keep=1)
                assert _leftovers(root) == [], point
                assert sorted(p.name for p in root.iterdir()) == ["latest", tag], point
                fresh.load_checkpoint(root)
                assert_same_state(training_state(fresh), after, skip=("torch_rng",))


def test_crash_points_are_each_reached_once_in_a_normal_save(tmp_path, monkeypatch):
    import hetmem.checkpoint.files as files

    seen = []
    monkeypatch.setattr(files, "crash_point", lambda name: seen.append(name))
    import hetmem.checkpoint.save as save

    monkeypatch.setattr(save, "crash_point", lambda name: seen.append(name))
    engine = _bn_engine()
    train_engine(engine, bn_batches(1))
    engine.save_checkpoint(tmp_path, tag="a")
    engine.save_checkpoint(tmp_path, tag="b")
    seen.clear()
    engine.save_checkpoint(tmp_path, tag="b", keep=1)
    assert [p for p in CRASH_POINTS if p not in seen] == []
    assert sorted(set(seen)) == sorted(CRASH_POINTS)


CORRUPTIONS = [
    # (file, how, the error names)
    ("params.bin", "flip-last", r"params.bin: parameter 'fc2.bias' exp_avg_sq \(16 bytes at offset \d+\) fails its"),
    ("params.bin", "flip-first", r"params.bin: parameter 'fc1.weight' weights .* fails its"),
    ("params.bin", "truncate", r"params.bin has \d+ bytes, its index \d+; the file is truncated"),
    ("buffers.bin", "flip-first", r"buffers.bin: buffer 'bn.running_mean' .* fails its"),
    ("rng.json", "flip-first", r"rng.json fails its"),
    ("optimizer.json", "flip-last", r"optimizer.json fails its"),
    ("client_state.pt", "flip-last", r"client_state.pt fails its"),
    ("meta.json", "flip-middle", r"meta.json fails its crc32 check"),
    ("params.bin", "delete", r"params.bin is missing"),
    ("buffers.bin", "delete", r"buffers.bin is missing"),
    ("rng.json", "delete", r"rng.json is missing"),
    ("client_state.pt", "delete", r"client_state.pt is missing"),
    ("meta.json", "delete", r"CURRENT names 'v-[^']+', which has no meta.json"),
]


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[:-10])
        return
    at = {"flip-first": 0, "flip-last": len(data) - 1, "flip-middle": len(data) // 2}[how]
    data[at] ^= 0x01
    path.write_bytes(data)


def test_a_damaged_checkpoint_is_refused_and_the_engine_is_untouched(tmp_path):
    """Each damage is named (file and what), the engine's weights, Adam state, step counts,
    buffers, counters and RNG stay bit for bit as they were, and training continues."""
    engine = _bn_engine()
    train_engine(engine, bn_batches(2))
    pristine = engine.save_checkpoint(tmp_path / "pristine", client_state={"epoch": 3, "seen": torch.arange(4)})
    train_engine(engine, bn_batches(2, seed=1))   # the live state now differs from the checkpoint
    for file, how, message in CORRUPTIONS:
        root = tmp_path / f"{file}-{how}"
        shutil.copytree(pristine.parent, root)
        _damage(resolve(root) / file, how)
        before = training_state(engine)
        with pytest.raises(CheckpointError, match=message):
            engine.load_checkpoint(root)
        assert_same_state(training_state(engine), before)
    train_engine(engine, bn_batches(1, seed=2))
    assert engine.load_checkpoint(pristine)["epoch"] == 3


def test_pickled_code_is_refused_at_save_and_at_load(tmp_path):
    engine = _bn_engine()
    train_engine(engine, bn_batches(1))
    folder = engine.save_checkpoint(tmp_path / "ckpt", client_state={"step": 1})

    for refused in (Custom(), lambda: 0):   # an object of a class; something pickle cannot even write
        with pytest.raises(ValueError, match=r"client_state cannot go into a checkpoint: .*weights_only=True"):
            engine.save_checkpoint(tmp_path / "ckpt", tag="bad", client_state={"obj": refused})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", folder.name]
    # a checkpoint someone else crafted, checksums made to match: its pickle is never run
    version = resolve(folder)
    payload = tmp_path / "evil.pt"
    torch.save({"x": subprocess.Popen}, payload)   # a global weights_only refuses
    data = payload.read_bytes()
    (version / "client_state.pt").write_bytes(data)
    meta = read_meta(version)
    from hetmem.checkpoint.files import checksum

    meta["files"]["client_state.pt"] = {"nbytes": len(data), "crc": checksum(
        meta["checksum"], torch.frombuffer(bytearray(data), dtype=torch.uint8))}
    (version / "meta.json").write_bytes(encode_meta(meta))
    before = training_state(engine)
    with pytest.raises(CheckpointError, match=r"client_state.pt cannot be loaded with torch.load\(weights_only=True\)"):
        engine.load_checkpoint(folder)
    assert_same_state(training_state(engine), before)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (skipped where mounting is not permitted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


class Custom:
    """Any class: weights_only loading refuses its instances."""


def _gpt_engine():
    from tests.engine.helpers import config, pair

    return hetmem.initialize(pair()[1], config())   # a checkpoint of about 2 MiB


@pytest.mark.parametrize("where", ["before", "mid-write"])
def test_a_full_disk_is_named_and_leaves_nothing_behind(small_disk, monkeypatch, where):
    from tests.engine.helpers import batches

    engine = _gpt_engine()
    train_engine(engine, batches(1))
    root = small_disk / "ckpt"
    first = engine.save_checkpoint(root)
    expected = training_state(engine)
    train_engine(engine, batches(1, seed=1))
    if where == "mid-write":  # the free-space check passes; the disk fills while writing
        import hetmem.checkpoint.files as files

        monkeypatch.setattr(files, "check_free_space", lambda folder, need: None)
    with pytest.raises(OSError, match=rf"not enough space in {root} to save the checkpoint: it needs .* \(\d+ bytes\)") as info:
        engine.save_checkpoint(root, tag=first.name)   # the same tag: both versions need room
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(root)
    assert _leftovers(root) == []
    fresh = _gpt_engine()
    fresh.load_checkpoint(root)
    assert_same_state(training_state(fresh), expected, skip=("torch_rng",))


def test_a_full_disk_simulated_where_no_tmpfs_can_be_mounted(tmp_path, monkeypatch):
    """The same promise without mounting: too little free space reported, then ENOSPC mid-write."""
    import shutil as shutil_module
    from collections import namedtuple

    import hetmem.checkpoint.save as save

    engine = _bn_engine()
    train_engine(engine, bn_batches(1))
    root = tmp_path / "ckpt"
    first = engine.save_checkpoint(root)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 1000, 1000))
    with pytest.raises(OSError, match=r"it needs .* \(\d+ bytes\) and 1000 B are free"):
        engine.save_checkpoint(root, tag="second")
    monkeypatch.undo()

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(save, "_write_buffers", full)
    with pytest.raises(OSError, match=r"not enough space in .* the disk filled up while writing") as info:
        engine.save_checkpoint(root, tag=first.name)
    assert info.value.errno == errno.ENOSPC
    assert _leftovers(root) == [] and sorted(p.name for p in root.iterdir()) == ["latest", first.name]
