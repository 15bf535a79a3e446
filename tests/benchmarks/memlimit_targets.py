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


def small_engine_breakdown(nvme_dir: str) -> dict:
    """A small GPT with state on NVMe: benchmarks/memory_accounting.py's breakdown at the end of its
    steps and at their peak, in a fresh process (so the baseline is this engine's)."""
    import torch

    import hetmem
    from hetmem.benchmarks.memory_accounting import (PeakSampler, allocator_state, breakdown_now,
                                                     preload_lazy_torch_modules, status_bytes)
    from hetmem.models.gpt import GPT, GPTConfig

    lazy = preload_lazy_torch_modules()
    baseline_rss, baseline = status_bytes()["VmRSS"], allocator_state()
    with torch.device("meta"):
        model = GPT(GPTConfig(block_size=32, n_layer=4, n_head=4, d_model=256, checkpoint=True))
    engine = hetmem.initialize(model, hetmem.Config(device="cpu", device_budget="4MiB", host_budget="24MiB",
                                                    nvme_dir=nvme_dir, dtype="bf16", memory_trace=False),
                               init_fn=model.init_weights)
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with PeakSampler(lambda: breakdown_now(engine, baseline_rss, baseline), interval=0.002) as peak:
        for _ in range(3):
            engine.backward(engine(x, x))
            engine.step()
    end = breakdown_now(engine, baseline_rss, baseline)
    at_peak = peak.at_peak or end
    engine.close(keep_weights=False)
    return {"at_end": end, "at_peak": at_peak, "lazy_imports": lazy}
