"""hetmem/host_memory.py: freed heap buffers really go back to the OS."""
from __future__ import annotations

from hetmem.benchmarks import memlimit

MiB = 1 << 20


def test_trim_returns_freed_heap_pages_that_free_alone_keeps():
    # 2048 blocks of 64 KiB (below any mmap threshold: glibc's heap) under a live block, in a fresh process
    r = memlimit.run_limited("tests.benchmarks.memlimit_targets", "heap_freed_then_trimmed",
                             {"blocks": 2048, "block_bytes": 64 * 1024}, limit_bytes=None, timeout_s=120)
    assert r["ok"], r
    assert r["freed"] > r["allocated"] - 32 * MiB, r  # free() kept (nearly) all 128 MiB resident
    assert r["released"] is True
    assert r["trimmed"] < r["freed"] - 96 * MiB, r      # malloc_trim gave it back


def test_mmap_threshold_env_is_read_checked_and_named_in_errors():
    import pytest

    from hetmem.host_memory import ENV_THRESHOLD, THRESHOLD, mmap_threshold

    assert mmap_threshold({}) == THRESHOLD == 256 * 1024
    assert mmap_threshold({ENV_THRESHOLD: "1MiB"}) == MiB
    assert mmap_threshold({ENV_THRESHOLD: " 65536 "}) == 64 * 1024
    assert mmap_threshold({ENV_THRESHOLD: "glibc"}) is None
    for bad in ("lots", "1GiB", "4KiB", "-1", "1.5.MiB"):
        with pytest.raises(ValueError, match=f"{ENV_THRESHOLD}='{bad}'.*'glibc'"):
            mmap_threshold({ENV_THRESHOLD: bad})


_THRESHOLD_CHILD = """
import ctypes, json, os, sys
sys.path.insert(0, sys.argv[1])
from hetmem.benchmarks.memory_accounting import malloc_stats
from hetmem.host_memory import return_freed_buffers_to_os
applied = return_freed_buffers_to_os()
warm = bytearray(4 << 20)  # freeing a 4 MiB mmap'ed block raises glibc's adaptive threshold past 300 KiB
del warm
before = malloc_stats()["mmapped"]
block = bytearray(300 * 1024)  # above 256 KiB, below glibc's 32 MiB adaptive ceiling
during = malloc_stats()["mmapped"]
del block
print(json.dumps({"applied": applied, "mmapped_by_block": during - before,
                  "after_free": malloc_stats()["mmapped"] - before}))
"""


def _threshold_child(env_value):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "HETMEM_MMAP_THRESHOLD"}
    if env_value is not None:
        env["HETMEM_MMAP_THRESHOLD"] = env_value
    out = subprocess.run([sys.executable, "-c", _THRESHOLD_CHILD, str(Path(__file__).resolve().parents[1])],
                         capture_output=True, text=True, timeout=120, env=env)
    return out, (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None)


def test_the_threshold_sends_a_steps_temporaries_to_mmap_and_back_and_glibc_leaves_it_alone():
    out, fixed = _threshold_child(None)
    assert out.returncode == 0, out.stderr
    assert fixed["applied"] is True
    assert fixed["mmapped_by_block"] >= 300 * 1024 and fixed["after_free"] == 0  # mmap'ed, then unmapped
    out, left = _threshold_child("glibc")
    assert out.returncode == 0, out.stderr
    assert left["applied"] is False and left["mmapped_by_block"] == 0  # adapted: the heap serves it
    out, _ = _threshold_child("nonsense")
    assert out.returncode != 0 and "HETMEM_MMAP_THRESHOLD='nonsense'" in out.stderr
