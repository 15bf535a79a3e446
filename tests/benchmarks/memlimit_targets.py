"""Functions the memlimit tests run in child processes: stdlib only, so a child starts in milliseconds."""
from __future__ import annotations


def touch(nbytes: int) -> dict:
    """Allocate ``nbytes`` and write every byte (resident, not just reserved)."""
    block = bytearray(b"\x01") * nbytes
    return {"first": block[0], "nbytes": len(block)}


def fail() -> dict:
    raise ValueError("bad key 'x'")


def no_memory() -> dict:
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: "
                       "you tried to allocate 1073741824 bytes.")


def sleep(seconds: float) -> dict:
    import time

    time.sleep(seconds)
    return {}


def heap_freed_then_trimmed(blocks: int, block_bytes: int) -> dict:
    """RSS after freeing heap blocks below a live one, then after hetmem's trim_freed_memory()."""
    from hetmem.host_memory import trim_freed_memory

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    held, pins = [], []
    for _ in range(blocks):  # each block followed by a small live one: freed blocks are holes in the heap
        held.append(bytearray(block_bytes))
        held[-1][::4096] = b"\x01" * len(range(0, block_bytes, 4096))
        pins.append(bytearray(b"\x01") * 2048)
    allocated = rss()
    del held
    freed = rss()
    released = trim_freed_memory()
    return {"allocated": allocated, "freed": freed, "trimmed": rss(), "released": released, "kept": len(pins)}
