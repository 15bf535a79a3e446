"""asyncio helpers: aiofiles-based tensor reads and writes, the SLOW fallback.

aiofiles runs each file call in a worker thread of the event loop's executor: buffered
IO through the page cache, one call at a time per file, and a copy through ``bytes`` on
reads.  Use it only where the aio op is unavailable and the caller is asyncio code.
The fast path from asyncio is ``await wait_request(async_file.pread(t, off))``: the C++
engine does the IO and one executor thread waits for it.

aiofiles is an optional dependency (``pip install hetmem[aio]``).
"""
from __future__ import annotations

import asyncio
import errno
import os

import torch

from hetmem.nvme.aio import Request, _check_offset, _check_tensor


def _aiofiles():
    try:
        import aiofiles
    except ImportError as exc:
        raise ImportError("hetmem.nvme.asyncio_files needs aiofiles: `pip install aiofiles` "
                          "(or `pip install hetmem[aio]`)") from exc
    return aiofiles


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


async def write_tensor(path: str | os.PathLike, tensor: torch.Tensor, offset: int = 0) -> None:
    """Write all bytes of a contiguous CPU tensor at ``offset`` (file created if missing)."""
    _check_tensor(tensor, "tensor")
    _check_offset(offset)
    aiofiles = _aiofiles()
    data = memoryview(_bytes_of(tensor).numpy())
    mode = "r+b" if os.path.exists(path) else "w+b"
    async with aiofiles.open(path, mode) as f:
        await f.seek(offset)
        written = 0
        while written < len(data):
            n = await f.write(data[written:])
            if not n:
                raise OSError(errno.EIO, f"short write: {written} of {len(data)} B at offset {offset}", str(path))
            written += n
        await f.flush()


async def read_tensor(path: str | os.PathLike, tensor: torch.Tensor, offset: int = 0) -> None:
    """Fill a contiguous CPU tensor with the bytes at ``offset``; OSError if the file is shorter."""
    _check_tensor(tensor, "tensor")
    _check_offset(offset)
    aiofiles = _aiofiles()
    target = _bytes_of(tensor)
    async with aiofiles.open(path, "rb") as f:
        await f.seek(offset)
        data = await f.read(target.numel())
    if len(data) != target.numel():
        raise OSError(errno.EIO, f"short read: {len(data)} of {target.numel()} B at offset {offset} "
                                 f"(the file ends first)", str(path))
    if data:
        target.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))


async def wait_request(request: Request) -> None:
    """Await an AsyncFile request from asyncio code (the fast path); raises as ``wait()``."""
    if request.done():
        request.wait()
        return
    await asyncio.get_running_loop().run_in_executor(None, request.wait)
