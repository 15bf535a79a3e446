"""Checksums of blob bytes for SwapSpace.

``crc32c`` is CRC-32C (Castagnoli; crc32c(b"123456789") == 0xE3069283), computed by the
aio op in C++ (SSE4.2 on three streams where the CPU has it).  Without the op it is
computed by ``crc32c_python``, a correct but slow (a few MB/s) pure-Python table, so
``blob_checksum()`` then uses zlib's CRC-32 instead, which runs at C speed: a swap space's
checksums live only as long as the swap space, so the two never meet.
"""
from __future__ import annotations

import ctypes
import zlib
from typing import Callable

import torch

from hetmem.nvme._op import aio_op

_POLY = 0x82F63B78  # CRC-32C, bit-reflected


def _make_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c_python(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C in pure Python (slow: for small buffers and for checking the C++ one)."""
    r = ~crc & 0xFFFFFFFF
    table = _TABLE
    for byte in bytes(data):
        r = (r >> 8) ^ table[(r ^ byte) & 0xFF]
    return ~r & 0xFFFFFFFF


def _memory(ptr: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(ptr)).cast("B")


def _address(data) -> tuple[int, int, object]:
    """(pointer, nbytes, keepalive) of a contiguous CPU tensor or a bytes-like object."""
    if isinstance(data, torch.Tensor):
        if data.device.type != "cpu" or not data.is_contiguous():
            raise ValueError(f"crc32c needs a contiguous CPU tensor, got device {data.device}, "
                             f"contiguous={data.is_contiguous()}")
        return data.data_ptr(), data.numel() * data.element_size(), data
    view = memoryview(data).cast("B")
    buf = (ctypes.c_char * len(view)).from_buffer_copy(view) if view.readonly else (ctypes.c_char * len(view)).from_buffer(view)
    return ctypes.addressof(buf), len(view), buf


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of a contiguous CPU tensor's bytes (or a bytes-like object), extending ``crc``."""
    ptr, nbytes, keep = _address(data)
    op = aio_op()
    if op is not None:
        result = int(op.crc32c(ptr, nbytes, crc))
        del keep
        return result
    result = crc32c_python(_memory(ptr, nbytes), crc) if nbytes else crc
    del keep  # the memory stays valid until here
    return result


def blob_checksum() -> tuple[str, Callable[[int, int], int]]:
    """(algorithm name, function(pointer, nbytes) -> int) for SwapSpace; GIL released inside."""
    op = aio_op()
    if op is not None:
        return "crc32c", lambda ptr, nbytes: int(op.crc32c(ptr, nbytes))
    return "crc32 (zlib; the aio op is not built)", lambda ptr, nbytes: zlib.crc32(_memory(ptr, nbytes)) if nbytes else 0
