"""Swap checksums on worker threads: still byte-exact, still never a corrupted read reported done."""
from __future__ import annotations

import threading
import zlib

import pytest
import torch

from hetmem.nvme import BlobState, SwapChecksumError, SwapSpace
from hetmem.nvme.checksum import crc32c

MiB = 1 << 20


def _pattern(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


class _Gate:
    """Wraps a swap space's checksum function: records the threads it ran on and, while closed,
    holds every call until opened."""

    def __init__(self, swap: SwapSpace):
        self.workers = swap._checksums
        self.inner = self.workers._fn
        self.threads: list[str] = []
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.opened.set()
        self.workers._fn = self

    def __call__(self, ptr: int, nbytes: int) -> int:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.opened.wait(60), "the test never opened the gate"
        return self.inner(ptr, nbytes)


def test_corrupted_blob_is_caught_on_the_worker(tmp_path, backend):
    """A flipped byte in the file fails the load with SwapChecksumError (key, path, offset); it was
    verified on the verify worker, and the load is never done before that verification ended."""
    sizes = {"A": MiB + 5, "B": 3 * 4096, "C": 777}
    with SwapSpace(tmp_path, sizes, backend=backend, checksum=True) as swap:
        data = {k: _pattern(n, seed=i) for i, (k, n) in enumerate(sizes.items())}
        for k, t in data.items():
            swap.store(k, t).wait()
        offset_b = swap._blobs["B"].offset
        _flip(swap.path, offset_b + 4097)
        gate = _Gate(swap)
        gate.opened.clear()
        out = torch.empty(sizes["B"], dtype=torch.uint8)
        req = swap.load("B", out)
        assert gate.entered.wait(60)  # the read landed and its verification started (held)
        assert not req.done() and req.error is None  # landed, not verified: not done
        gate.opened.set()
        with pytest.raises(SwapChecksumError) as info:
            req.wait()
        e = info.value
        assert e.key == "B" and e.offset == offset_b and e.filename == str(swap.path) and e.nbytes == sizes["B"]
        assert req.done() and isinstance(req.error, SwapChecksumError)
        assert gate.threads[-1].startswith("hetmem-swap-verify")
        # the others are intact and still read back byte-exact
        for k in ("A", "C"):
            got = torch.empty(sizes[k], dtype=torch.uint8)
            swap.load(k, got).wait()
            assert torch.equal(got, data[k])


def test_store_checksum_is_of_the_bytes_written(tmp_path, backend):
    """The crc is taken on the crc worker, the store is not done before it is, and it equals the
    crc32c of the bytes in the file."""
    sizes = {"A": 2 * MiB + 17, "B": 4096}
    with SwapSpace(tmp_path, sizes, backend=backend, checksum=True) as swap:
        stats = swap.stats  # a live dict (the pipeline tuner keeps it and reads it later)
        gate = _Gate(swap)
        gate.opened.clear()
        data = _pattern(sizes["A"], seed=11)
        req = swap.store("A", data)
        assert gate.entered.wait(60)
        req.io.wait()  # the write landed; its checksum is still held at the gate
        assert not req.done() and swap.state("A") is BlobState.WRITING
        assert swap.stored_checksum("A") is None
        gate.opened.set()
        req.wait()
        assert gate.threads == ["hetmem-swap-crc-hetmem"]
        stored = swap.stored_checksum("A")
        with open(swap.path, "rb") as f:
            f.seek(swap._blobs["A"].offset)
            on_disk = f.read(sizes["A"])
        assert on_disk == data.numpy().tobytes()
        if swap.checksum_algorithm == "crc32c":
            assert stored == crc32c(on_disk)
        else:  # the zlib fallback (no aio op)
            assert stored == zlib.crc32(on_disk)
        assert stats["checksum_inline_seconds"] == 0.0  # no checksum on this thread
        assert stats["stored_bytes"] == sizes["A"] and stats["checksum_bytes"] == sizes["A"]
        assert stats["checksum_seconds"] > 0 and stats is swap.stats


def test_failed_store_keeps_its_checksum_off_the_blob(tmp_path):
    with SwapSpace(tmp_path, {"A": 8192}, checksum=True) as swap:
        swap.store("A", _pattern(8192, seed=1)).wait()
        good = swap.stored_checksum("A")
        swap.file.inject_fault("error", after=0)
        req = swap.store("A", _pattern(8192, seed=2))
        with pytest.raises(OSError):
            req.wait()
        assert req.done() and req.crc.done() and swap.state("A") is BlobState.FAILED
        assert swap.stored_checksum("A") is None and good is not None
        with pytest.raises(ValueError, match="last store failed"):
            swap.load("A", torch.empty(8192, dtype=torch.uint8))
        data = _pattern(8192, seed=3)
        swap.store("A", data).wait()  # stored again: loads verify against the new checksum
        out = torch.empty_like(data)
        swap.load("A", out).wait()
        assert torch.equal(out, data)


def test_checksum_threads_stop_at_close(tmp_path):
    names = lambda: {t.name for t in threading.enumerate() if t.name.startswith("hetmem-swap-")}  # noqa: E731
    before = names()
    swap = SwapSpace(tmp_path, {"A": 4096}, checksum=True, name="stopping")
    assert {"hetmem-swap-crc-stopping", "hetmem-swap-verify-stopping"} <= names()
    swap.store("A", _pattern(4096, seed=4))  # in flight at close
    swap.close()
    assert names() == before
