"""Where a process's memory goes: what the kernel says (RSS, peak, disk bytes) against hetmem's
own accounting of the bytes it holds (chunks per kind, cached buffers, chunk padding).

Used by the benchmarks that report memory (nvme_vs_deepspeed.py, train_scale.py).  The kernel's
side comes from ``/proc/<pid>/status`` (VmRSS, VmHWM), ``/proc/<pid>/smaps_rollup`` and
``/proc/<pid>/io``; hetmem's side from the chunk manager's per-tier, per-kind counters.
``rss_breakdown`` puts them together: RSS = baseline (the interpreter, torch, the data: measured
before the engine exists) + each named part + what is left, so nothing is hidden in a total.

What was left, measured (README "Memory overhead"): glibc keeping freed buffers in its heap
(the fp32 GRAD chunks of the warm-up step, freed when gradients move into the PARAM slots),
chunk padding (capacity beyond the parameters a chunk holds), and torch's temporaries.
"""
from __future__ import annotations

import ctypes
import ctypes.util

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
    free (kept, still resident once touched), ``mmapped`` in mmap'ed blocks; None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _Mallinfo2
    info = mallinfo2()
    return {"heap": info.arena, "heap_free": info.fordblks, "mmapped": info.hblkhd}


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
    """hetmem's own bytes in memory now (between steps): chunks per kind, the free buffers its
    pool keeps, the module's buffers, the unused part of the NVMe tier's IO region.  Activations are gone between steps; their peak is
    ``engine.tracer.store.peak_non_model`` (what a step adds on top, with its temporaries)."""
    parts = {f"chunks.{kind}": nbytes for kind, nbytes in chunk_bytes_by_kind(engine.manager).items()}
    parts["pool_free_buffers"] = engine.manager.pool.cached_bytes
    parts["module_buffers"] = engine.buffer_bytes
    io_pool = getattr(engine.manager.nvme, "pool", None)  # the NVMe tier's IO region (nvme/io_pool.py)
    if io_pool is not None:
        stats = io_pool.stats()  # its blocks in use are chunk payloads, counted above; the rest is faulted in
        parts["io_pool_unused"] = max(0, stats["capacity"] - stats["in_use"])
    return parts


def process_parts(baseline_smaps: dict[str, int]) -> dict[str, int]:
    """What the process holds that is nobody's state: file-backed pages mapped since the baseline
    (the C++ ops' libraries, torch's lazily loaded code).  glibc's free heap bytes are not a part:
    ``malloc_stats()`` counts pages malloc_trim gave back as free too, so they are reported beside
    the breakdown, not inside it."""
    now = smaps_rollup()
    return {"files_mapped_since_baseline": max(0, (now["Rss"] - now["Anonymous"])
                                               - (baseline_smaps["Rss"] - baseline_smaps["Anonymous"]))}


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
    return (f"RSS {b['rss'] / unit:.0f} MiB = baseline {b['baseline'] / unit:.0f} + {parts} + "
            f"unaccounted {b['unaccounted'] / unit:.0f} (MiB)")
