"""The aiofiles helpers (slow fallback) and awaiting AsyncFile requests from asyncio."""
from __future__ import annotations

import asyncio

import pytest
import torch

from hetmem.nvme import AsyncFile

pytest.importorskip("aiofiles")

from hetmem.nvme.asyncio_files import read_tensor, wait_request, write_tensor  # noqa: E402


def test_round_trip_with_aiofiles(tmp_path):
    path = tmp_path / "a.bin"
    data = torch.randn(1000, dtype=torch.float32).to(torch.bfloat16)
    out = torch.empty_like(data)

    async def main():
        await write_tensor(path, data, 777)
        await write_tensor(path, torch.ones(3, dtype=torch.uint8), 0)  # reopens without truncating
        await read_tensor(path, out, 777)
        with pytest.raises(OSError, match="short read"):
            await read_tensor(path, torch.empty(10), 10_000)

    asyncio.run(main())
    assert torch.equal(out.view(torch.int16), data.view(torch.int16))
    assert path.read_bytes()[:3] == b"\x01\x01\x01"


def test_await_async_file_requests(tmp_path):
    data = torch.randint(0, 256, (4 << 20,), dtype=torch.uint8)
    out = torch.empty_like(data)

    async def main():
        with AsyncFile(tmp_path / "b.bin") as f:
            await wait_request(f.pwrite(data, 0))
            await asyncio.gather(wait_request(f.pread(out[: 2 << 20], 0)),
                                 wait_request(f.pread(out[2 << 20:], 2 << 20)))
            with pytest.raises(OSError, match="short read"):
                await wait_request(f.pread(torch.empty(10), 1 << 30))

    asyncio.run(main())
    assert torch.equal(out, data)
