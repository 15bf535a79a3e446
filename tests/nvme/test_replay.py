"""Recording a swap space's requests and replaying them alone (the step's own disk time)."""
from __future__ import annotations

import errno
import os
import threading
from types import SimpleNamespace

import pytest
import torch

import hetmem.nvme.swap as swap_module
from hetmem.nvme import SwapSpace
from hetmem.nvme.replay import IoRecord, IoRecorder, replay

MiB = 1 << 20
SETTINGS = dict(block_size=256 * 1024, queue_depth=4, threads=1)


def _pattern(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _record(tmp_path, backend: str, checksum: bool):
    """A pipeline-like pattern: store three blobs, then load one while storing the next, twice."""
    sizes = {"A": MiB, "B": 2 * MiB + 100, "C": 5000, "D": MiB}
    swap = SwapSpace(tmp_path / "swap", sizes, backend=backend, checksum=checksum, **SETTINGS)
    data = {k: _pattern(n, seed=i) for i, (k, n) in enumerate(sizes.items())}
    with swap.recording() as rec:
        first = [swap.store(k, data[k]) for k in "ABC"]
        for r in first:
            r.wait()
        out = {k: torch.empty_like(v) for k, v in data.items()}
        pair = [swap.load("A", out["A"]), swap.store("D", data["D"])]
        pair += [swap.load("B", out["B"]), swap.load("C", out["C"])]
        for r in pair:
            r.wait()
    swap.store("A", data["A"]).wait()  # after the recording: not recorded
    for k in "ABC":
        assert torch.equal(out[k], data[k])
    return swap, rec, sizes


def test_record_then_replay_moves_the_recorded_bytes(tmp_path, backend):
    swap, rec, sizes = _record(tmp_path, backend, checksum=True)
    with swap:
        records = rec.records
        assert [(r.op, r.key) for r in records] == [("write", "A"), ("write", "B"), ("write", "C"), ("read", "A"),
                                                    ("write", "D"), ("read", "B"), ("read", "C")]
        for r in records:
            assert r.offset == swap._blobs[r.key].offset and r.nbytes >= sizes[r.key]
            assert 1 <= r.inflight <= 4
        assert records[0].inflight == 1 and records[3].inflight == 1  # all waited before the load of A
        assert rec.bytes("write") == sum(r.nbytes for r in records if r.op == "write")
        before = sorted(os.listdir(swap.directory))
        result = replay(records, str(swap.directory), backend=backend, lock="off", **SETTINGS)
        assert sorted(os.listdir(swap.directory)) == before  # the scratch file is gone
    assert result["requests"] == len(records)
    assert result["read_bytes"] == rec.bytes("read") and result["write_bytes"] == rec.bytes("write")
    assert result["bytes"] == rec.bytes() and result["bytes_per_s"] > 0
    assert result["inflight"] == max(r.inflight for r in records)
    assert result["buffer_kind"].startswith("aligned") and "locked" not in result["buffer_kind"]
    wider = replay(records, str(tmp_path), backend=backend, lock="off", inflight=8, **SETTINGS)
    assert wider["inflight"] == 8 and wider["bytes"] == rec.bytes()


def test_replay_refuses_what_it_cannot_do(tmp_path, monkeypatch):
    records = [IoRecord("write", "A", 0, MiB, 1, 0.0), IoRecord("read", "A", 0, MiB, 2, 0.1)]
    with pytest.raises(ValueError, match="at least one recorded request"):
        replay([], str(tmp_path), backend="threads", **SETTINGS)
    with pytest.raises(ValueError, match="below the 2 requests"):
        replay(records, str(tmp_path), backend="threads", inflight=1, **SETTINGS)
    missing = tmp_path / "no" / "such"
    with pytest.raises(ValueError, match=f"replay folder '{missing}' is not an existing folder"):
        replay(records, str(missing), backend="threads", **SETTINGS)
    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")
    with pytest.raises(ValueError, match="not an existing folder"):
        replay(records, str(a_file), backend="threads", **SETTINGS)
    with pytest.raises(ValueError, match="not a read or write"):
        replay([IoRecord("trim", "A", 0, MiB, 1, 0.0)], str(tmp_path), backend="threads", **SETTINGS)
    monkeypatch.setattr(swap_module, "free_bytes", lambda directory: MiB // 2)  # a full disk
    with pytest.raises(OSError) as info:
        replay(records, str(tmp_path), backend="threads", **SETTINGS)
    assert info.value.errno == errno.ENOSPC
    assert f"needs a scratch file of {MiB} B" in str(info.value) and f"only {MiB // 2} B" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["file"]  # nothing left behind


def test_a_recording_does_not_nest(tmp_path):
    with SwapSpace(tmp_path, {"A": 4096}) as swap:
        with swap.recording():
            with pytest.raises(ValueError, match="already recording"):
                with swap.recording():
                    pass
        with swap.recording() as rec:  # the first one ended: a new one may start
            swap.store("A", _pattern(4096, seed=1)).wait()
        assert [r.key for r in rec.records] == ["A"]



class _FakeEngine:
    """An engine whose one request is in flight until ``landed`` is set; counts the polls."""

    def __init__(self):
        self.landed = False
        self.polls = 0
        self.polled = threading.Event()  # set at every 20th poll

    def poll(self, rid: int) -> tuple:
        self.polls += 1
        if self.polls % 20 == 0:
            self.polled.set()
        return (self.landed,)


def test_idle_time_counts_only_when_nothing_is_in_flight():
    engine = _FakeEngine()
    request = SimpleNamespace(_finished=False, _id=1, file=SimpleNamespace(_engine=engine))
    swap = SimpleNamespace(_recorder=None, path="fake.swap")
    with pytest.raises(ValueError, match="idle_poll_s=0"):
        IoRecorder(swap, idle_poll_s=0)
    recorder = IoRecorder(swap, idle_poll_s=0.0005)
    recorder._outstanding.append(request)  # in flight from the start
    with recorder:
        assert engine.polled.wait(60)
        assert recorder.idle_s == 0.0  # polled 20 times, in flight every time
        engine.polled.clear()
        engine.landed = True
        assert engine.polled.wait(60)  # the next 20 polls
        while recorder.idle_s == 0.0:  # (the poller adds an interval after the poll that saw it land)
            assert engine.polled.wait(60)
            engine.polled.clear()
    assert 0 < recorder.idle_s <= recorder.elapsed_s and swap._recorder is None
