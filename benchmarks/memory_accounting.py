"""Where a process's memory goes: what the kernel says (RSS, peak, disk bytes) against hetmem's
own accounting of the bytes it holds (chunks per kind, cached buffers, chunk padding).

Used by the benchmarks that report memory (nvme_vs_deepspeed.py, train_scale.py).  The kernel's
side comes from ``/proc/<pid>/status`` (VmRSS, VmHWM), ``/proc/<pid>/smaps_rollup`` and
``/proc/<pid>/io``; hetmem's side from the chunk manager's per-tier, per-kind counters.
``rss_breakdown`` puts them together: RSS = baseline (the interpreter, torch, the data: measured
before the engine exists) + each named part + what is left, so nothing is hidden in a total.

Every part is read off the kernel or an allocator, never derived from a config: the IO pool's
resident bytes by mincore(2), glibc's bytes in use and its heap's resident pages by mallinfo2 and
``/proc/self/smaps``, the torch modules imported on first use by RSS before and after.  What is
left (``unaccounted``) is what none of them explains: Python's own object arenas (mmap'ed by the
interpreter, outside glibc's counters) and the C++ ops' threads.  README "Memory overhead" has
the figures.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import sys
import threading

from hetmem.chunk_manager.states import ChunkKind, Tier

MEMORY_TIERS = (Tier.DEVICE, Tier.HOST)  # on a CPU both are host memory; NVMe is not memory


def _proc(pid: int | str, name: str) -> str:
    with open(f"/proc/{pid}/{name}") as f:
        return f.read()


def status_bytes(pid: int | str = "self") -> dict[str, int]:
    """``/proc/<pid>/status`` sizes in bytes: VmRSS (now), VmHWM (peak RSS), VmSize, ..."""
    out = {}
    for line in _proc(pid, "status").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def peak_rss(pid: int | str = "self") -> int:
    """The process's peak resident set (VmHWM), bytes."""
    return status_bytes(pid)["VmHWM"]


def smaps_rollup(pid: int | str = "self") -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup`` in bytes: Rss, Anonymous, Private_Dirty, Shared_Clean, ..."""
    out = {}
    for line in _proc(pid, "smaps_rollup").splitlines()[1:]:
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def disk_io(pid: int | str = "self") -> dict[str, int]:
    """Bytes this process made the block layer read and write (``read_bytes``/``write_bytes`` of
    ``/proc/<pid>/io``: all its threads, O_DIRECT and page-cache writeback alike)."""
    fields = dict(line.split(": ") for line in _proc(pid, "io").splitlines())
    return {"read_bytes": int(fields["read_bytes"]), "write_bytes": int(fields["write_bytes"])}


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_stats() -> dict[str, int] | None:
    """glibc's heap: ``heap`` bytes taken from the OS by brk/arenas, ``heap_free`` of them
    free (kept, still resident once touched), ``in_use`` of them handed out, ``mmapped`` in
    mmap'ed blocks (each one allocation of at least the mmap threshold); None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _Mallinfo2
    info = mallinfo2()
    return {"heap": info.arena, "heap_free": info.fordblks, "in_use": info.uordblks, "mmapped": info.hblkhd}


HEAP_MAX = 64 << 20  # glibc's thread arenas are mappings aligned to this (HEAP_MAX_SIZE on 64-bit)


def heap_resident(pid: int | str = "self") -> int:
    """Resident bytes of glibc's heaps: the main arena (``[heap]``) and the thread arenas (anonymous
    mappings starting on a 64 MiB boundary), from ``/proc/<pid>/smaps``."""
    total, counting = 0, False
    for line in _proc(pid, "smaps").splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            start = int(head[0].split("-")[0], 16)
            name = head[5] if len(head) > 5 else ""
            counting = name == "[heap]" or (name == "" and start % HEAP_MAX == 0 and "rw" in head[1])
        elif counting and head and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


# torch modules imported on first use: torch.utils.checkpoint and torch.optim.Optimizer.add_param_group
# are wrapped by torch._disable_dynamo, which imports torch._dynamo (and sympy) the first time they run
LAZY_TORCH_MODULES = ("torch._dynamo",)


def preload_lazy_torch_modules() -> int:
    """Import the torch modules a training step imports on first use (LAZY_TORCH_MODULES) now, before
    a baseline is measured; returns the RSS they added (0 when they were loaded already).  Any
    framework that checkpoints activations or uses a torch optimizer pays them."""
    missing = [name for name in LAZY_TORCH_MODULES if name not in sys.modules]
    before = status_bytes()["VmRSS"]
    for name in missing:
        importlib.import_module(name)
    return max(0, status_bytes()["VmRSS"] - before) if missing else 0


def allocator_state() -> dict[str, int]:
    """What process_parts compares with a baseline: glibc's bytes in use (heap + mmap'ed blocks), its
    heaps' resident pages, and the file-backed resident pages (smaps_rollup)."""
    heap = malloc_stats() or {"in_use": 0, "mmapped": 0}
    rollup = smaps_rollup()
    return {"malloc_in_use": heap["in_use"] + heap["mmapped"], "heap_in_use": heap["in_use"],
            "heap_resident": heap_resident(), "file_resident": rollup["Rss"] - rollup["Anonymous"]}


def chunk_bytes_by_kind(manager) -> dict[str, int]:
    """Chunk payload bytes in memory (device + host tiers) per chunk kind, from the manager's counters."""
    counters = manager.counters()
    kinds = list(ChunkKind)
    out: dict[str, int] = {}
    for tier_index, tier in enumerate(Tier):
        if tier not in MEMORY_TIERS:
            continue
        for kind_index, kind in enumerate(kinds):
            value = counters[tier_index * len(kinds) + kind_index]
            if value:
                out[kind.name.lower()] = out.get(kind.name.lower(), 0) + value
    return out


def padding_share(layout) -> float:
    """Chunk capacity beyond the parameters the chunks hold, as a share of the parameters."""
    capacity = sum(group.capacity for group in layout.groups)
    return capacity / layout.numel - 1.0


def engine_parts(engine) -> dict[str, int]:
    """hetmem's own bytes in memory now: chunks per kind (device and host tiers), the free buffers
    its pool keeps, the module's buffers, and the pages of the NVMe tier's IO region that are
    resident (mincore) but hold no block (``io_pool_unused``).  The region's blocks in use are
    chunk payloads and cached buffers, counted above."""
    parts = {f"chunks.{kind}": nbytes for kind, nbytes in chunk_bytes_by_kind(engine.manager).items()}
    parts["pool_free_buffers"] = engine.manager.pool.cached_bytes
    parts["module_buffers"] = engine.buffer_bytes
    io_pool = getattr(engine.manager.nvme, "pool", None)  # the NVMe tier's IO region (nvme/io_pool.py)
    if io_pool is not None:
        parts["io_pool_unused"] = max(0, io_pool.resident_bytes() - io_pool.stats()["in_use"])
    return parts


def malloced_engine_bytes(engine, parts: dict[str, int]) -> int:
    """Of ``engine_parts``' bytes, those glibc's malloc holds (everything but the IO region's)."""
    io_pool = getattr(engine.manager.nvme, "pool", None)
    inside = io_pool.stats()["in_use"] if io_pool is not None else 0
    return max(0, sum(v for k, v in parts.items() if k != "io_pool_unused") - inside)


def process_parts(baseline: dict[str, int], engine_malloced: int = 0) -> dict[str, int]:
    """What the process holds beyond hetmem's own bytes, each against ``baseline``
    (``allocator_state()`` before the engine existed):

    - ``temporaries``: glibc's bytes in use beyond the baseline and the engine's own malloc'ed bytes
      (``engine_malloced``): activations, autograd's gradients before they land in a chunk, the IO
      engine's staging buffers, tensors' and C++ objects' small allocations (glibc counts bytes
      handed out, touched or not: a buffer never written counts here without being resident, so
      ``unaccounted`` may go a few MiB below 0: -4 to -6 MiB on a 0.4M-parameter GPT);
    - ``allocator_free``: resident pages of glibc's heaps that hold nothing (its holes);
    - ``files_mapped_since_baseline``: file-backed pages (the C++ ops' libraries, torch code paged in).
    """
    now = allocator_state()
    return {"temporaries": max(0, now["malloc_in_use"] - baseline["malloc_in_use"] - engine_malloced),
            "allocator_free": max(0, (now["heap_resident"] - now["heap_in_use"])
                                  - max(0, baseline["heap_resident"] - baseline["heap_in_use"])),
            "files_mapped_since_baseline": max(0, now["file_resident"] - baseline["file_resident"])}


def breakdown_now(engine, baseline_rss: int, baseline: dict[str, int]) -> dict:
    """``rss_breakdown`` of this process now: hetmem's parts and the process's parts.  Reading them
    takes a few milliseconds while the training thread goes on, so VmRSS is read before and after:
    ``rss`` is the later one (the parts were read up to then), ``rss_moved`` how far it moved
    meanwhile (what ``unaccounted`` may be off by, mid-step)."""
    before = status_bytes()["VmRSS"]
    parts = engine_parts(engine)
    parts.update(process_parts(baseline, malloced_engine_bytes(engine, parts)))
    after = status_bytes()["VmRSS"]
    return {**rss_breakdown(after, baseline_rss, parts), "rss_moved": after - before}


class PeakSampler:
    """A thread that reads VmRSS every ``interval`` seconds and, at each new high (by at least
    ``step`` bytes), calls ``snapshot()``: what the process held at (about) its peak, which a
    snapshot between steps cannot see.  Use as a context manager; ``at_peak`` holds the last result."""

    def __init__(self, snapshot, interval: float = 0.005, step: int = 1 << 20):
        self._snapshot, self._interval, self._step = snapshot, interval, step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hetmem-peak-sampler", daemon=True)
        self.peak = 0            # the highest VmRSS read
        self.at_peak = None      # snapshot() at the last new high

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            rss = status_bytes()["VmRSS"]
            if rss >= self.peak + self._step:
                self.peak = rss
                self.at_peak = self._snapshot()

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def rss_breakdown(rss: int, baseline: int, parts: dict[str, int]) -> dict:
    """RSS split into the baseline, each named part and what is left (``unaccounted``; negative
    when the parts claim more than is resident, e.g. a peak figure among them)."""
    if rss < 0 or baseline < 0 or any(v < 0 for v in parts.values()):
        raise ValueError(f"rss_breakdown takes byte counts >= 0; got rss={rss}, baseline={baseline}, parts={parts}")
    accounted = sum(parts.values())
    return {"rss": rss, "baseline": baseline, "parts": dict(parts), "accounted": accounted,
            "unaccounted": rss - baseline - accounted,
            "overhead_ratio": (rss - baseline) / accounted if accounted else None}


def format_breakdown(b: dict, unit: int = 1 << 20) -> str:
    """One line: 'RSS 650 MiB = baseline 227 + chunks.master 128 + ... + unaccounted 40 (MiB)'."""
    parts = " + ".join(f"{name} {value / unit:.0f}" for name, value in b["parts"].items() if value)
    moved = f"; RSS moved {b['rss_moved'] / unit:+.0f} MiB while the parts were read" \
        if abs(b.get("rss_moved", 0)) >= unit else ""
    return (f"RSS {b['rss'] / unit:.0f} MiB = baseline {b['baseline'] / unit:.0f} + {parts} + "
            f"unaccounted {b['unaccounted'] / unit:.0f} (MiB){moved}")
