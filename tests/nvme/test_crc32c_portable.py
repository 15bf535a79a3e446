"""csrc/aio/crc32c.cpp built with HETMEM_CRC32C_PORTABLE (the path an aarch64 build without
the CRC extension, or any other CPU, takes) gives the same CRC-32C as the op's own path."""
from __future__ import annotations

import ctypes
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from hetmem.nvme.checksum import crc32c, crc32c_python

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "aio"
DRIVER = """#include "crc32c.h"
extern "C" unsigned crc(unsigned c, const void* d, unsigned long n) { return hetmem::aio::crc32c_extend(c, d, n); }
extern "C" const char* which() { return hetmem::aio::crc32c_implementation(); }
"""
SIZES = [0, 1, 7, 17, 1023, 8192, 3 * 8192, 3 * 8192 + 5, 2 * 3 * 8192 + 4095, (1 << 20) + 3]


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    folder = tmp_path_factory.mktemp("crc32c")
    (folder / "driver.cpp").write_text(DRIVER)
    lib = folder / "crc32c_portable.so"
    subprocess.run([compiler, "-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                    "-DHETMEM_CRC32C_PORTABLE", f"-I{CSRC}", str(folder / "driver.cpp"), str(CSRC / "crc32c.cpp"),
                    "-o", str(lib)], check=True, capture_output=True)
    module = ctypes.CDLL(str(lib))
    module.crc.restype = ctypes.c_uint
    module.crc.argtypes = [ctypes.c_uint, ctypes.c_char_p, ctypes.c_ulong]
    module.which.restype = ctypes.c_char_p
    return module


def test_the_portable_build_takes_the_table_path(portable):
    assert portable.which() == b"table (slicing-by-8)"
    assert portable.crc(0, b"123456789", 9) == 0xE3069283


def test_the_portable_path_matches_the_ops_path_at_odd_sizes(portable):
    rng = random.Random(11)
    for n in SIZES:
        data = bytes(rng.getrandbits(8) for _ in range(n)) if n < 4096 else rng.randbytes(n)
        expected = crc32c(data)
        assert portable.crc(0, data, n) == expected, f"{n} bytes"
        if n < 4096:
            assert crc32c_python(data) == expected
        # extending: crc(A || B) from crc(A)
        half = n // 3
        assert portable.crc(portable.crc(0, data[:half], half), data[half:], n - half) == expected
