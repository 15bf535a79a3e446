"""What each property of the NVMe IO buffers buys: O_DIRECT read / write / mixed GB/s by buffer kind.

    python benchmarks/io_buffers.py --dir /nvme/scratch [--chunk 64MiB] [--total 1GiB] [--repeats 5] [--json]

Buffer kinds, each a fresh ``IoBufferPool`` (hetmem/nvme/io_pool.py) per repeat, in the same run, the
kinds' order rotating from one repeat to the next so a drifting disk hits them all:

- ``aligned``: page-aligned, nothing else (what a per-transfer allocation gives: page faults
  land in the transfers);
- ``+prefaulted``: every page touched once before timing;
- ``+huge``: transparent huge pages asked for (madvise) before the touch;
- ``+locked``: mlock'ed as well (the runtime's default where mlock is allowed);
- ``staging``: the transfer goes through one locked block and a memcpy to/from a plain
  (prefaulted) buffer, as an engine that reads into staging buffers would.

Each pass writes then reads ``--total`` bytes as ``--chunk``-sized transfers (two in flight) and
runs the mixed pass (reads of one region while the other is written, as the optimizer pipeline
does).  The table prints medians (and min-max) over ``--repeats``; every figure names its kind.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: import hetmem from it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from hetmem.nvme.aio import AsyncFile
from hetmem.nvme.bench import BenchFile, measure_mixed
from hetmem.nvme.io_pool import IoBufferPool
from hetmem.units import parse_size

# name -> IoBufferPool options
KINDS = {
    "aligned": dict(prefault=False, huge=False, lock="off"),
    "aligned+prefaulted": dict(prefault=True, huge=False, lock="off"),
    "aligned+prefaulted+huge": dict(prefault=True, huge=True, lock="off"),
    "aligned+prefaulted+huge+locked": dict(prefault=True, huge=True, lock="auto"),
    "aligned+prefaulted+locked": dict(prefault=True, huge=False, lock="auto"),
}
STAGING = "staging (locked) + memcpy"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=tempfile.gettempdir(), help="folder on the disk to measure (your nvme_dir)")
    p.add_argument("--chunk", default="64MiB", help="bytes per transfer (a chunk)")
    p.add_argument("--total", default="1GiB", help="bytes per pass")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    return p


def _pass(path: str, op: str, buffers: list[torch.Tensor], total: int, chunk: int,
          staged_from: list[torch.Tensor] | None = None) -> float:
    """GB/s of one pass; with ``staged_from`` every transfer copies through ``buffers``."""
    with AsyncFile(path) as f:
        inflight: deque = deque()
        started = time.perf_counter()
        for i in range(total // chunk):
            if len(inflight) == len(buffers):
                done_i, req = inflight.popleft()
                req.wait()
                if staged_from is not None and op == "read":
                    staged_from[done_i % len(staged_from)].copy_(buffers[done_i % len(buffers)])
            buf = buffers[i % len(buffers)]
            if op == "write":
                if staged_from is not None:
                    buf.copy_(staged_from[i % len(staged_from)])
                inflight.append((i, f.pwrite(buf, i * chunk)))
            else:
                inflight.append((i, f.pread(buf, i * chunk)))
        while inflight:
            done_i, req = inflight.popleft()
            req.wait()
            if staged_from is not None and op == "read":
                staged_from[done_i % len(staged_from)].copy_(buffers[done_i % len(buffers)])
        return total / (time.perf_counter() - started) / 1e9


def measure(args) -> dict:
    chunk, total = parse_size(args.chunk, key="--chunk"), parse_size(args.total, key="--total")
    total -= total % chunk
    names = list(KINDS) + [STAGING]
    rates = {n: {"write": [], "read": [], "mixed": []} for n in names}
    kinds = {}
    os.makedirs(args.dir, exist_ok=True)
    with BenchFile(args.dir, total, chunk) as scratch:
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                options = KINDS.get(name, KINDS["aligned+prefaulted+huge+locked"])
                pool = IoBufferPool(3 * chunk, **options)
                buffers = [pool.take(chunk) for _ in range(3)]
                plain = None
                if name == STAGING:
                    plain = [torch.ones(chunk, dtype=torch.uint8) for _ in range(2)]
                kinds[name] = pool.kind if name != STAGING else f"staging via {pool.kind}"
                rates[name]["write"].append(_pass(scratch.path, "write", buffers[:2], total, chunk, plain))
                rates[name]["read"].append(_pass(scratch.path, "read", buffers[:2], total, chunk, plain))
                if name != STAGING:
                    mixed = measure_mixed(args.dir, total_bytes=total, chunk_bytes=chunk, path=scratch.path,
                                          buffers=buffers)
                    rates[name]["mixed"].append(mixed["total_bytes_per_s"] / 1e9)
                del buffers, pool
    out = {}
    for name in names:
        out[name] = {"kind": kinds[name]}
        for op, values in rates[name].items():
            if values:
                out[name][op] = {"median_gb_s": statistics.median(values), "min": min(values), "max": max(values)}
    base = out["aligned"]
    for name in names:
        for op in ("write", "read", "mixed"):
            if op in out[name]:
                out[name][op]["vs_aligned"] = out[name][op]["median_gb_s"] / base[op]["median_gb_s"]
    return {"benchmark": "io_buffers", "chunk_bytes": chunk, "total_bytes": total, "repeats": args.repeats,
            "kinds": out}


def table(result: dict) -> str:
    lines = [f"O_DIRECT by buffer kind: {result['total_bytes'] >> 20} MiB per pass in "
             f"{result['chunk_bytes'] >> 20} MiB transfers, median (min-max) of {result['repeats']} repeats, GB/s",
             f"{'buffer kind':44s} {'write':>20s} {'read':>20s} {'mixed r+w':>20s}"]
    for name, row in result["kinds"].items():
        cells = []
        for op in ("write", "read", "mixed"):
            if op not in row:
                cells.append(f"{'-':>20s}")
                continue
            c = row[op]
            cells.append(f"{c['median_gb_s']:5.2f} ({c['min']:.2f}-{c['max']:.2f}) {c['vs_aligned']:4.2f}x")
        lines.append(f"{row['kind']:44s} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    result = measure(args)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
