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
