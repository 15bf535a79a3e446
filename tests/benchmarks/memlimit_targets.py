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
