"""CRC-32C: the known vector, the SSE4.2 and table paths against a bitwise reference."""
from __future__ import annotations

import pytest
import torch

from hetmem.nvme import crc32c
from hetmem.nvme._op import aio_op
from hetmem.nvme.checksum import crc32c_python


def _bitwise(data: bytes) -> int:
    """CRC-32C one bit at a time: the definition, independent of both tables."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_known_vectors():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c_python(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros


@pytest.mark.parametrize("n", [1, 7, 15, 16, 17, 1023, 24575, 24576, 24577, 3 * 24576 + 5])
def test_paths_agree_with_the_definition(n):
    op = aio_op()
    if op is None:
        pytest.skip("the aio op is not built here")
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    expected = _bitwise(data.numpy().tobytes()) if n < 30000 else crc32c_python(data.numpy().tobytes())
    assert crc32c(data) == expected
    assert op.crc32c_table(data.data_ptr(), n) == expected


def test_extending_a_crc_equals_one_pass():
    data = torch.randint(0, 256, (100_003,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    whole = crc32c(data)
    assert crc32c(data[50_001:], crc32c(data[:50_001])) == whole
    assert crc32c_python(data[7:].numpy().tobytes(), crc32c_python(data[:7].numpy().tobytes())) == crc32c_python(
        data.numpy().tobytes()) == whole


def test_rejects_non_contiguous():
    with pytest.raises(ValueError, match="contiguous"):
        crc32c(torch.zeros(4, 4, dtype=torch.uint8).t())
