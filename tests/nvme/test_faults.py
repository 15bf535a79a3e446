"""Faults: injected errors and short transfers in every backend, a real ENOSPC, no O_DIRECT."""
from __future__ import annotations

import errno
import logging
import os

import pytest
import torch

from hetmem.nvme import AsyncFile, aligned_empty, release_buffer

MiB = 1 << 20


def _pattern(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _read_file(path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


@pytest.fixture
def written(tmp_path, backend):
    """A file whose first 4 MiB hold known bytes, open on `backend` with 1 MiB blocks."""
    path = tmp_path / "f.bin"
    f = AsyncFile(path, backend=backend, block_size="1MiB", queue_depth=4)
    earlier = _pattern(4 * MiB, seed=1)
    f.pwrite(earlier, 0).wait()
    yield f, path, earlier
    if not f.closed:
        f.close()


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_injected_error_on_write(written, err):
    f, path, earlier = written
    f.inject_fault("error", after=2, errno=err)
    req = f.pwrite(_pattern(4 * MiB, seed=2), 4 * MiB)
    with pytest.raises(OSError) as info:
        req.wait()
    assert req.done()
    e = info.value
    assert e.errno == err and e.filename == str(path)
    message = str(e)
    assert os.strerror(err) in message and "pwrite of 4194304 B at offset 4194304" in message
    assert _read_file(path, 0, 4 * MiB) == earlier.numpy().tobytes()  # earlier data intact
    f.close()  # the failure was waited for: close does not raise it again


def test_injected_error_on_read(written):
    f, path, earlier = written
    f.inject_fault("error", after=1, errno=errno.EIO)
    out = torch.empty(4 * MiB, dtype=torch.uint8)
    with pytest.raises(OSError, match="Input/output error during pread") as info:
        f.pread(out, 0).wait()
    assert info.value.errno == errno.EIO
    f.pread(out, 0).wait()  # one-shot: the next read succeeds and sees the data
    assert torch.equal(out, earlier)


@pytest.mark.parametrize("direction", ["pwrite", "pread"])
def test_injected_short_transfer_raises(written, direction):
    f, path, earlier = written
    f.inject_fault("short", after=0, short_by=4096)
    buf = _pattern(2 * MiB, seed=3) if direction == "pwrite" else torch.empty(2 * MiB, dtype=torch.uint8)
    req = f.pwrite(buf, 4 * MiB) if direction == "pwrite" else f.pread(buf, 0)
    with pytest.raises(OSError, match=f"short {direction[1:]}") as info:
        req.wait()
    assert info.value.errno == errno.EIO
    assert f"moved {MiB - 4096} B" in str(info.value)  # the IO that fell short, and by how much
    assert _read_file(path, 0, 4 * MiB) == earlier.numpy().tobytes()


def test_injected_partial_completion_is_resubmitted(written):
    """A completion that moved only part of its bytes is finished by a resubmission."""
    f, path, _ = written
    data = _pattern(3 * MiB, seed=4)
    f.inject_fault("partial", after=1, short_by=8192)
    f.pwrite(data, 8 * MiB).wait()
    assert _read_file(path, 8 * MiB, 3 * MiB) == data.numpy().tobytes()
    out = torch.empty(3 * MiB, dtype=torch.uint8)
    f.inject_fault("partial", after=0, short_by=4096)
    f.pread(out, 8 * MiB).wait()
    assert torch.equal(out, data)


def test_injected_fault_on_staged_request(written):
    """Unaligned requests (through staging buffers) check their completions too."""
    f, path, earlier = written
    f.inject_fault("error", after=0, errno=errno.EIO)
    with pytest.raises(OSError, match="Input/output error"):
        f.pwrite(_pattern(5000, seed=5), 1001).wait()
    f.inject_fault("short", after=0)
    with pytest.raises(OSError, match="short read"):
        f.pread(torch.empty(5000, dtype=torch.uint8), 1001).wait()
    assert _read_file(path, 0, 1001) == earlier.numpy().tobytes()[:1001]


def test_requests_after_a_failure_still_work(written):
    f, path, _ = written
    f.inject_fault("error", after=0)
    with pytest.raises(OSError):
        f.pwrite(_pattern(MiB, seed=6), 0).wait()
    f.pwrite(_pattern(MiB, seed=7), 16 * MiB).wait()
    assert _read_file(path, 16 * MiB, MiB) == _pattern(MiB, seed=7).numpy().tobytes()


def test_a_failure_fails_only_its_own_request(written):
    """Two requests in flight, one injected failure: exactly one raises, the other lands."""
    f, path, _ = written
    f.inject_fault("error", after=0)
    reqs = {seed: f.pwrite(_pattern(MiB, seed=seed), seed * MiB) for seed in (20, 21)}
    failed = []
    for seed, req in reqs.items():
        try:
            req.wait()
        except OSError:
            failed.append(seed)
    assert len(failed) == 1
    (ok,) = set(reqs) - set(failed)
    assert _read_file(path, ok * MiB, MiB) == _pattern(MiB, seed=ok).numpy().tobytes()


def test_real_enospc_on_a_small_tmpfs(small_tmpfs, backend):
    """A 1 MiB file system: the write that does not fit raises ENOSPC; earlier data stays."""
    path = small_tmpfs / "f.bin"
    earlier = _pattern(256 * 1024, seed=8)
    with AsyncFile(path, backend=backend, block_size=128 * 1024, queue_depth=4) as f:
        f.pwrite(earlier, 0).wait()
        too_big = aligned_empty(2 * MiB)
        too_big.fill_(0xAB)
        with pytest.raises(OSError) as info:
            f.pwrite(too_big, 256 * 1024).wait()
        release_buffer(too_big)
        assert info.value.errno == errno.ENOSPC, info.value
        assert "No space left on device" in str(info.value)
        back = torch.empty_like(earlier)
        f.pread(back, 0).wait()
        assert torch.equal(back, earlier)


def test_buffered_fallback_when_o_direct_is_refused(ramfs, engine_backend, caplog):
    """ramfs refuses O_DIRECT: the file is opened buffered, with a warning, and works."""
    path = ramfs / "f.bin"
    data = _pattern(MiB + 3, seed=9)
    with caplog.at_level(logging.WARNING, logger="hetmem.nvme.aio"):
        with AsyncFile(path, backend=engine_backend) as f:
            assert not f.direct and f.alignment == (1, 1)
            f.pwrite(data, 5).wait()
            back = torch.empty_like(data)
            f.pread(back, 5).wait()
            assert torch.equal(back, data)
    assert any("O_DIRECT is not available" in r.getMessage() for r in caplog.records)
    expected = "linux_aio" if engine_backend == "linux_aio" else engine_backend
    assert f.backend == expected
