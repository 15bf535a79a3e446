"""AsyncFile: byte-exact round trips on every backend, requests in flight, errors, the GIL."""
from __future__ import annotations

import gc
import os
import threading
import time
import weakref

import pytest
import torch

from hetmem.nvme import AsyncFile, aligned_empty, release_buffer

SIZES = [1, 511, 4096, 4097, (1 << 20) + 3, 64 << 20]
OFFSETS = [0, 3 * 4096, 777]


def _random_bytes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def _file_bytes(path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_is_byte_exact(tmp_path, backend, size):
    path = tmp_path / "data.bin"
    with AsyncFile(path, backend=backend, block_size="1MiB", queue_depth=8) as f:
        assert f.backend == backend
        for i, offset in enumerate(OFFSETS):
            data = _random_bytes(size, seed=size + i)
            f.pwrite(data, offset).wait()
            assert _file_bytes(path, offset, size) == data.numpy().tobytes()  # on disk, byte-exact
            back = torch.zeros(size, dtype=torch.uint8)
            f.pread(back, offset).wait()
            assert torch.equal(back, data)


def test_round_trip_aligned_buffers_and_dtypes(tmp_path, backend):
    with AsyncFile(tmp_path / "d.bin", backend=backend, block_size="1MiB", queue_depth=4) as f:
        for dtype, numel in [(torch.float32, (1 << 18) + 7), (torch.bfloat16, 1023), (torch.float16, 4096),
                             (torch.int64, 17)]:
            src = aligned_empty(numel, dtype)
            src.copy_(torch.randn(numel).to(dtype) if dtype.is_floating_point else torch.arange(numel, dtype=dtype))
            f.pwrite(src, 8192).wait()
            dst = aligned_empty(numel, dtype)
            f.pread(dst, 8192).wait()
            assert torch.equal(src.view(torch.uint8), dst.view(torch.uint8))
            release_buffer(src)
            release_buffer(dst)


def test_unaligned_memory_is_staged(tmp_path, backend):
    base = _random_bytes(3 * 4096 + 100, seed=1)
    src = base[5:5 + 2 * 4096]  # aligned length and offset, memory off by 5 bytes
    with AsyncFile(tmp_path / "d.bin", backend=backend, block_size="1MiB") as f:
        f.pwrite(src, 4096).wait()
        out = torch.zeros(3 * 4096 + 100, dtype=torch.uint8)
        dst = out[3:3 + 2 * 4096]
        f.pread(dst, 4096).wait()
        assert torch.equal(dst, src)
        assert int(out[:3].count_nonzero()) == 0 and int(out[3 + 2 * 4096:].count_nonzero()) == 0


def test_unaligned_write_keeps_neighbours(tmp_path, backend):
    """A read-modify-write at unaligned edges must not disturb the bytes around it."""
    path = tmp_path / "d.bin"
    with AsyncFile(path, backend=backend) as f:
        background = _random_bytes(5 * 4096, seed=2)
        f.pwrite(background, 0).wait()
        patch = _random_bytes(4096 + 10, seed=3)
        f.pwrite(patch, 4096 + 1000).wait()
        expected = background.clone()
        expected[4096 + 1000:4096 + 1000 + patch.numel()] = patch
        assert _file_bytes(path, 0, 5 * 4096) == expected.numpy().tobytes()
        assert os.path.getsize(path) == 5 * 4096


def test_unaligned_tail_write_sets_exact_size(tmp_path, backend):
    path = tmp_path / "d.bin"
    with AsyncFile(path, backend=backend) as f:
        f.pwrite(_random_bytes(4097, seed=4), 10).wait()
        assert os.path.getsize(path) == 4107
        f.pwrite(_random_bytes(3, seed=5), 9000).wait()
        assert os.path.getsize(path) == 9003
        assert _file_bytes(path, 4107, 9000 - 4107) == bytes(9000 - 4107)  # the gap reads as zeros


def test_many_requests_in_flight(tmp_path, backend):
    n, size = 48, 256 * 1024 + 512
    chunks = [_random_bytes(size, seed=100 + i) for i in range(n)]
    with AsyncFile(tmp_path / "d.bin", backend=backend, block_size=64 * 1024, queue_depth=16, threads=2) as f:
        writes = [f.pwrite(c, i * size) for i, c in enumerate(chunks)]
        for w in writes:
            w.wait()
        outs = [torch.empty(size, dtype=torch.uint8) for _ in range(n)]
        reads = [f.pread(o, i * size) for i, o in enumerate(outs)]
        for r in reversed(reads):
            r.wait()
        assert all(torch.equal(a, b) for a, b in zip(chunks, outs))


def test_concurrent_unaligned_writes_sharing_a_unit(tmp_path, backend):
    """Requests whose unaligned edges share one aligned unit must both land."""
    path = tmp_path / "d.bin"
    pieces = [_random_bytes(300, seed=200 + i) for i in range(40)]
    with AsyncFile(path, backend=backend, queue_depth=8, threads=2) as f:
        reqs = [f.pwrite(p, i * 300) for i, p in enumerate(pieces)]
        for r in reqs:
            r.wait()
    assert _file_bytes(path, 0, 40 * 300) == torch.cat(pieces).numpy().tobytes()
    assert os.path.getsize(path) == 40 * 300  # no aligned padding left past the end


def test_read_past_end_raises_and_holes_read_zeros(tmp_path, backend):
    path = tmp_path / "d.bin"
    with AsyncFile(path, backend=backend) as f:
        f.pwrite(_random_bytes(4096, seed=6), 1 << 20).wait()  # leaves a hole [0, 1 MiB)
        hole = torch.full((8192,), 7, dtype=torch.uint8)
        f.pread(hole, 4096).wait()
        assert int(hole.count_nonzero()) == 0
        beyond = torch.empty(4096, dtype=torch.uint8)
        with pytest.raises(OSError, match="short read") as info:
            f.pread(beyond, 2 << 20).wait()
        assert str(path) in str(info.value)
        straddle = torch.empty(8192, dtype=torch.uint8)  # half inside the file, half past its end
        req = f.pread(straddle, (1 << 20))
        with pytest.raises(OSError, match="short read"):
            req.wait()
        assert req.done()


def test_zero_length_and_validation(tmp_path, backend):
    with AsyncFile(tmp_path / "d.bin", backend=backend) as f:
        empty = torch.empty(0)
        req = f.pwrite(empty, 0)
        req.wait()
        assert req.done()
        with pytest.raises(ValueError, match="contiguous"):
            f.pwrite(torch.zeros(4, 4).t(), 0)
        with pytest.raises(ValueError, match="offset"):
            f.pread(torch.zeros(4), -1)
        with pytest.raises(ValueError, match="torch.Tensor"):
            f.pwrite(b"abc", 0)
    with pytest.raises(ValueError, match="queue_depth"):
        AsyncFile(tmp_path / "e.bin", queue_depth=0)
    with pytest.raises(ValueError, match="block_size"):
        AsyncFile(tmp_path / "e.bin", block_size=1000)
    with pytest.raises(ValueError, match="backend"):
        AsyncFile(tmp_path / "e.bin", backend="libaio")
    with pytest.raises(ValueError, match="closed"):
        f.pwrite(torch.zeros(1), 0)


def test_read_only_mode_and_missing_file(tmp_path, backend):
    path = tmp_path / "ro.bin"
    with pytest.raises(FileNotFoundError):
        AsyncFile(path, mode="r", backend=backend)
    path.write_bytes(b"x" * 5000)
    with AsyncFile(path, mode="r", backend=backend) as f:
        out = torch.empty(5000, dtype=torch.uint8)
        f.pread(out, 0).wait()
        assert bytes(out.numpy()) == b"x" * 5000
        with pytest.raises(RuntimeError, match="read-only"):
            f.pwrite(out, 0)


def test_gil_is_released_while_waiting(tmp_path, backend):
    """Another Python thread keeps running while a large request waits."""
    size = 256 << 20
    buf = aligned_empty(size)
    buf.fill_(1)
    ticks = 0
    stop = threading.Event()

    def spin():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    with AsyncFile(tmp_path / "d.bin", backend=backend, block_size="1MiB", queue_depth=1) as f:
        thread = threading.Thread(target=spin)
        thread.start()
        try:
            time.sleep(0.05)
            req = f.pwrite(buf, 0)
            before = ticks
            started = time.perf_counter()
            req.wait()
            waited = time.perf_counter() - started
            during = ticks - before
        finally:
            stop.set()
            thread.join()
    release_buffer(buf)
    assert waited > 0.02, "the write finished too fast to tell"
    assert during > 1000, f"the other thread advanced only {during} times in {waited:.3f} s"


def test_request_holds_its_tensor(tmp_path, backend):
    with AsyncFile(tmp_path / "d.bin", backend=backend, block_size="1MiB", queue_depth=1) as f:
        data = torch.ones(32 << 20, dtype=torch.uint8)
        ref = weakref.ref(data)
        req = f.pwrite(data, 0)
        del data
        gc.collect()
        assert ref() is not None or req.done()  # alive while in flight
        req.wait()
        gc.collect()
        assert ref() is None  # released once complete


def test_close_raises_a_failure_nobody_waited_for(tmp_path, backend):
    f = AsyncFile(tmp_path / "d.bin", backend=backend)
    f.pread(torch.empty(4096, dtype=torch.uint8), 1 << 30)  # past the end; never waited
    with pytest.raises(OSError, match="nobody waited"):
        f.close()
    assert f.closed


def test_fallback_when_op_disabled(tmp_path):
    """HETMEM_DISABLE_OPS=aio: one warning, the python_threads backend, same results."""
    import subprocess
    import sys

    code = f"""
import logging, torch
logging.basicConfig(level=logging.WARNING)
from hetmem.nvme import AsyncFile, probe_io
path = {str(tmp_path / 'fb.bin')!r}
data = torch.randint(0, 256, (4097,), dtype=torch.uint8)
for _ in range(2):
    with AsyncFile(path, backend="auto") as f:
        assert f.backend == "python_threads", f.backend
        f.pwrite(data, 777).wait()
        out = torch.empty_like(data)
        f.pread(out, 777).wait()
        assert torch.equal(out, data)
report = probe_io({str(tmp_path)!r})
assert report["auto"] == "python_threads", report
assert report["io_uring"].startswith("unavailable"), report
print("OK")
"""
    env = dict(os.environ, HETMEM_DISABLE_OPS="aio")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK"
    assert out.stderr.count("falls back to the slower pure-Python") == 1, out.stderr
