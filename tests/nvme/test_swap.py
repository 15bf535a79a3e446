"""SwapSpace: round trips, free-space refusal, checksums, stale runs, cleanup."""
from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import hetmem.nvme.swap as swap_module
from hetmem.nvme import BlobState, SwapChecksumError, SwapSpace, aligned_empty, release_buffer

MiB = 1 << 20


def _pattern(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_round_trip_many_keys(tmp_path, backend):
    sizes = {f"PARAM/{i}": s for i, s in enumerate([1, 511, 4096, 4097, MiB + 3, 3 * MiB, 77, 8192])}
    sizes["EXP_AVG/0"] = 2 * MiB
    data = {k: _pattern(n, seed=i) for i, (k, n) in enumerate(sizes.items())}
    with SwapSpace(tmp_path, sizes, backend=backend, queue_depth=4) as swap:
        assert swap.file.backend == backend
        stores = [swap.store(k, t) for k, t in data.items()]  # all in flight at once
        for r in stores:
            r.wait()
        outs = {k: torch.empty_like(t) for k, t in data.items()}
        loads = [swap.load(k, outs[k]) for k in reversed(list(data))]
        for r in loads:
            r.wait()
        for k in data:
            assert torch.equal(outs[k], data[k]), k
            assert swap.state(k) is BlobState.STORED


def test_pool_buffers_move_whole_slots_and_mix_directions(tmp_path, backend):
    """aligned_empty buffers of odd sizes; loads of some keys with stores of others in flight."""
    n = 3 * MiB + 100
    keys = [f"K/{i}" for i in range(6)]
    with SwapSpace(tmp_path, {k: n for k in keys}, backend=backend, checksum=True) as swap:
        bufs = [aligned_empty(n) for _ in keys]
        for i, b in enumerate(bufs):
            b.copy_(_pattern(n, seed=10 + i))
        for k, b in zip(keys[:3], bufs[:3]):
            swap.store(k, b).wait()
        out = [aligned_empty(n) for _ in range(3)]
        reqs = [swap.load(k, o) for k, o in zip(keys[:3], out)] + [swap.store(k, b) for k, b in zip(keys[3:], bufs[3:])]
        for r in reqs:
            r.wait()
        for o, b in zip(out, bufs[:3]):
            assert torch.equal(o, b)
        for t in bufs + out:
            release_buffer(t)


def test_free_space_is_checked_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(swap_module, "free_bytes", lambda directory: 10 * MiB)
    with pytest.raises(OSError) as info:
        SwapSpace(tmp_path / "swap", {"A": 8 * MiB, "B": 4 * MiB})
    e = info.value
    assert e.errno == errno.ENOSPC
    assert "needs 12582912 B" in str(e) and "only 10485760 B" in str(e) and str(tmp_path / "swap") in str(e)
    assert os.listdir(tmp_path / "swap") == []  # no swap file, no lock file
    with SwapSpace(tmp_path / "swap", {"A": 8 * MiB}) as swap:
        monkeypatch.setattr(swap_module, "free_bytes", lambda directory: 2 * MiB)  # 8 of the 10 used
        with pytest.raises(OSError, match=r"needs 4194304 B \(4.00 MiB\) more .* only 2097152 B"):
            swap.reserve({"B": 4 * MiB})
        assert swap.nbytes == 8 * MiB and os.path.getsize(swap.path) == 8 * MiB
        assert swap.keys() == ["A"]


def test_free_space_refusal_on_a_real_small_fs(small_tmpfs):
    with pytest.raises(OSError, match="needs .* free") as info:
        SwapSpace(small_tmpfs, {"A": 4 * MiB})
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(small_tmpfs) == []


def test_files_are_preallocated_and_removed_on_close(tmp_path):
    swap = SwapSpace(tmp_path, {"A": 5000, "B": 2 * MiB})
    assert swap.nbytes == 8192 + 2 * MiB
    st = os.stat(swap.path)
    assert st.st_size == swap.nbytes and st.st_blocks * 512 >= swap.nbytes  # blocks really reserved
    assert sorted(os.listdir(tmp_path)) == ["hetmem.swap", "hetmem.swap.lock"]
    assert swap.lock_path.read_text().strip() == str(os.getpid())
    swap.store("A", _pattern(5000, seed=1))  # in flight at close: close waits for it
    swap.close()
    swap.close()  # idempotent
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="closed"):
        swap.store("A", _pattern(5000, seed=1))


def test_checksum_mismatch_is_detected(tmp_path, backend):
    with SwapSpace(tmp_path, {"A": MiB, "B": 4096}, backend=backend, checksum=True) as swap:
        assert swap.checksum_algorithm == ("crc32c" if backend != "python_threads" else swap.checksum_algorithm)
        data = _pattern(MiB, seed=2)
        swap.store("A", data).wait()
        swap.store("B", _pattern(4096, seed=3)).wait()
        out = torch.empty_like(data)
        swap.load("A", out).wait()  # intact: passes
        with open(swap.path, "r+b") as f:  # corrupt one byte of A on disk
            f.seek(12345)
            byte = f.read(1)
            f.seek(12345)
            f.write(bytes([byte[0] ^ 0x01]))
        req = swap.load("A", out)
        with pytest.raises(SwapChecksumError) as info:
            req.wait()
        assert req.done()
        e = info.value
        assert isinstance(e, OSError) and e.key == "A" and e.offset == 0 and e.filename == str(swap.path)
        assert "'A'" in str(e) and "mismatch" in str(e)
        swap.load("B", torch.empty(4096, dtype=torch.uint8)).wait()  # other blobs unaffected
        assert swap.stats["checksum_bytes"] >= 3 * MiB


def test_without_checksum_corruption_is_not_checked(tmp_path):
    with SwapSpace(tmp_path, {"A": 4096}) as swap:
        assert swap.checksum_algorithm == "off"
        swap.store("A", _pattern(4096, seed=4)).wait()
        with open(swap.path, "r+b") as f:
            f.write(b"\xff")
        swap.load("A", torch.empty(4096, dtype=torch.uint8)).wait()


def test_load_errors_are_clear(tmp_path, backend):
    with SwapSpace(tmp_path, {"A": 4096, "B": 100}, backend=backend) as swap:
        with pytest.raises(ValueError, match=r"load\('A'\).*never stored"):
            swap.load("A", torch.empty(4096, dtype=torch.uint8))
        with pytest.raises(KeyError, match="no such blob"):
            swap.load("C", torch.empty(4096, dtype=torch.uint8))
        with pytest.raises(ValueError, match="has 4095 B but the blob was declared with 4096 B"):
            swap.store("A", torch.empty(4095, dtype=torch.uint8))
        with pytest.raises(ValueError, match="declared with 100 B already"):
            swap.reserve({"B": 200})
        swap.reserve({"B": 100})  # the same size again: a no-op
        big = torch.empty(64 * MiB, dtype=torch.uint8)
        swap.reserve({"BIG": big.numel()})
        req = swap.store("BIG", big)
        if not req.done():
            with pytest.raises(ValueError, match="in flight"):
                swap.load("BIG", big)
        req.wait()
        swap.file.inject_fault("error", after=0)
        failed = swap.store("A", _pattern(4096, seed=5))
        with pytest.raises(OSError):
            failed.wait()
        with pytest.raises(ValueError, match="last store failed"):
            swap.load("A", torch.empty(4096, dtype=torch.uint8))
        assert swap.state("A") is BlobState.FAILED


def test_second_swap_space_in_the_same_dir_is_refused(tmp_path):
    with SwapSpace(tmp_path, {"A": 4096}):
        with pytest.raises(OSError, match=f"in use by pid {os.getpid()}") as info:
            SwapSpace(tmp_path, {"A": 4096})
        assert info.value.errno == errno.EBUSY
        with SwapSpace(tmp_path, {"A": 4096}, name="other") as other:  # another name is fine
            assert other.path.name == "other.swap"


_CHILD = """
import sys, time, torch
from hetmem.nvme import SwapSpace
swap = SwapSpace(sys.argv[1], {"A": 1 << 20})
swap.store("A", torch.ones(1 << 20, dtype=torch.uint8)).wait()
print("ready", flush=True)
time.sleep(60)
"""


def test_stale_swap_of_a_killed_run_is_removed(tmp_path, caplog):
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(OSError, match=f"in use by pid {child.pid}"):  # alive: refused
            SwapSpace(tmp_path, {"A": 4096})
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert sorted(os.listdir(tmp_path)) == ["hetmem.swap", "hetmem.swap.lock"]  # left behind
    with caplog.at_level(logging.WARNING, logger="hetmem.nvme.swap"):
        with SwapSpace(tmp_path, {"B": 8192}) as swap:
            assert swap.nbytes == 8192 and os.path.getsize(swap.path) == 8192  # a fresh file
            swap.store("B", _pattern(8192, seed=6)).wait()
    stale = [r.getMessage() for r in caplog.records if "stale swap file" in r.getMessage()]
    assert stale and f"pid {child.pid}" in stale[0]
    assert os.listdir(tmp_path) == []


def test_dropped_swap_space_removes_its_files(tmp_path):
    swap = SwapSpace(tmp_path, {"A": 4096})
    swap.store("A", _pattern(4096, seed=7)).wait()
    del swap
    for _ in range(50):
        if not os.listdir(tmp_path):
            break
        time.sleep(0.01)
    assert os.listdir(tmp_path) == []
