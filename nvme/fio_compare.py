"""fio side by side with hetmem's engine: same file, same memory, interleaved.

Two things besides the engines differ between runs on a shared or virtual machine, so
both are held equal:

- the disk drifts from one minute to the next, so each comparison alternates hetmem and
  fio (io_uring and libaio engines) on the same laid-out file, ``repeats`` rounds in a
  shuffled order each, and compares medians;
- the speed of direct IO depends on which memory the buffers occupy (measured on the
  development VM: ten 64 MiB buffer pairs read 2 GiB at 1.2 to 3.4 GB/s, each pair
  reproducibly; fio allocates new buffers in every process, so its samples were bimodal),
  so both tools do their IO into the same pages: the first ``queue_depth x block_size``
  bytes of a file in /dev/shm, which fio maps with ``--iomem=mmapshared:FILE`` and hetmem
  with ``torch.from_file``.  hetmem then issues fio's pattern: one request per block,
  ``queue_depth x threads`` of them in flight, cycling through those ``queue_depth``
  block buffers - so only the engines differ (hetmem's figure includes its per-request
  Python overhead, which its chunk-sized requests normally amortise).  Without /dev/shm
  each tool uses its own memory and the result says ``same_memory: False``.

fio gets the same block size, queue depth and jobs (= threads), O_DIRECT, sequential.
Needs ``fio`` on PATH.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import uuid
from contextlib import contextmanager

import torch

from hetmem.nvme.bench import BenchFile, chunk_buffers, measure_mixed, measure_sequential, release_all

MiB = 1 << 20


@contextmanager
def shared_memory(nbytes: int):
    """(file, uint8 tensor) of ``nbytes`` backed by a /dev/shm file, or (None, None)."""
    if not os.path.isdir("/dev/shm"):
        yield None, None
        return
    path = f"/dev/shm/hetmem-fio-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(path, "wb") as f:
            f.truncate(nbytes)
        buf = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        buf.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
        yield path, buf
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _iomem(memory: str | None) -> list[str]:
    return [f"--iomem=mmapshared:{memory}"] if memory else []


def _fio_once(path: str, op: str, setting: dict, total_bytes: int, engine: str,
              memory: str | None = None) -> tuple[float, str]:
    threads = setting["threads"]
    per_job = total_bytes // threads
    cmd = ["fio", "--name=hetmem-cmp", f"--filename={path}", f"--size={per_job}", f"--offset_increment={per_job}",
           f"--numjobs={threads}", f"--rw={op}", f"--bs={setting['block_size']}",
           f"--iodepth={setting['queue_depth']}", "--direct=1", f"--ioengine={engine}", "--group_reporting",
           "--output-format=json", *_iomem(memory)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"fio failed: {(out.stderr.strip().splitlines() or [str(out.returncode)])[-1]}")
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    return float(job[op]["bw_bytes"]), " ".join(cmd).replace(path, "<file>").replace(memory or "\0", "<shm>")


def _fio_mixed_once(path: str, setting: dict, total_bytes: int, engine: str, memory: str | None = None,
                    seconds: int = 2) -> tuple[dict, str]:
    """fio: one job reading the first half of the file and one writing the second, at once
    (time-based, each looping over its half); the same IOs in flight in all as hetmem's."""
    half = total_bytes // 2
    depth = _mixed_depth(setting)
    cmd = ["fio", f"--filename={path}", "--direct=1", f"--ioengine={engine}", f"--bs={setting['block_size']}",
           f"--iodepth={depth}", "--time_based", f"--runtime={seconds}", "--output-format=json", *_iomem(memory),
           "--name=read", "--rw=read", "--offset=0", f"--size={half}",
           "--name=write", "--rw=write", f"--offset={half}", f"--size={half}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"fio failed: {(out.stderr.strip().splitlines() or [str(out.returncode)])[-1]}")
    jobs = {j["jobname"]: j for j in json.loads(out.stdout[out.stdout.index("{"):])["jobs"]}
    read, write = float(jobs["read"]["read"]["bw_bytes"]), float(jobs["write"]["write"]["bw_bytes"])
    command = " ".join(cmd).replace(path, "<file>").replace(memory or "\0", "<shm>")
    return {"read": read, "write": write, "total": read + write}, command


def compare_with_fio(directory: str, op: str, setting: dict, total_bytes: int, chunk_bytes: int,
                     repeats: int = 3, path: str | None = None) -> dict:
    """hetmem and fio (io_uring and libaio engines; same block size and IOs in flight,
    O_DIRECT) on the same laid-out file, interleaved ``repeats`` times so that the disk's
    drift hits both alike.  ``op``: "write" or "read" (sequential), or "mixed".  Medians in
    bytes/s (for "mixed", of the read + write total).  ``path``: a laid-out file of
    ``total_bytes`` to use (else a scratch one is made in ``directory``)."""
    if path is None:
        with BenchFile(directory, total_bytes, chunk_bytes) as bench:
            return compare_with_fio(directory, op, setting, total_bytes, chunk_bytes, repeats, bench.path)
    samples: dict[str, list] = {"hetmem": [], "fio io_uring": [], "fio libaio": []}
    commands = {}
    bs = setting["block_size"]
    depth = _mixed_depth(setting) if op == "mixed" else setting["queue_depth"]
    with shared_memory(depth * bs) as (memory, shared):
        buffers = ([shared[i * bs:(i + 1) * bs] for i in range(depth)] if memory else chunk_buffers(depth, bs))
        kind = getattr(buffers, "kind", "")
        try:
            _interleave(directory, op, setting, total_bytes, repeats, path, memory, buffers, samples, commands)
        finally:
            if not memory:
                release_all(buffers)
    if op == "mixed":
        median = {k: {d: statistics.median(x[d] for x in v) for d in ("read", "write", "total")}
                  for k, v in samples.items()}
    else:
        median = {k: statistics.median(v) for k, v in samples.items()}
    return {"setting": setting, "samples": samples, "median": median, "commands": commands,
            "same_memory": memory is not None,
            "buffer_kind": "fio's shared memory (both)" if memory else f"{kind} (hetmem; fio its own)"}


def _mixed_depth(setting: dict) -> int:
    """IOs in flight per direction in the mixed comparison: the same total as hetmem's."""
    return max(1, setting["queue_depth"] * setting["threads"] // 2)


def _interleave(directory: str, op: str, setting: dict, total_bytes: int, repeats: int, path: str,
                memory: str | None, buffers: list, samples: dict, commands: dict) -> None:
    """``repeats`` rounds of every tool, each round in a new (seeded) order."""
    order = random.Random(f"{op}{sorted(setting.items())}")
    bs = setting["block_size"]
    for _ in range(repeats):
        for tool in order.sample(list(samples), len(samples)):
            if tool == "hetmem" and op == "mixed":
                depth = _mixed_depth(setting)
                m = measure_mixed(directory, total_bytes=total_bytes, chunk_bytes=bs, path=path,
                                  buffers=buffers + buffers[:1], inflight_chunks=depth, **setting)
                value = {"read": m["read_bytes_per_s"], "write": m["write_bytes_per_s"],
                         "total": m["total_bytes_per_s"]}
            elif tool == "hetmem":
                value = measure_sequential(path, op, total_bytes=total_bytes, chunk_bytes=bs, buffers=buffers,
                                           inflight_chunks=setting["queue_depth"] * setting["threads"],
                                           **setting)["bytes_per_s"]
            else:
                engine = tool.split()[1]
                if op == "mixed":
                    value, commands[engine] = _fio_mixed_once(path, setting, total_bytes, engine, memory)
                else:
                    value, commands[engine] = _fio_once(path, op, setting, total_bytes, engine, memory)
            samples[tool].append(value)


def fio_grid(directory: str, *, total_bytes: int, chunk_bytes: int, backend: str = "auto",
             block_sizes=(MiB, 4 * MiB, 8 * MiB), queue_depths=(1, 4, 16, 32), repeats: int = 3,
             progress=None) -> list[dict]:
    """compare_with_fio for every block size x queue depth (1 thread), writes and reads,
    on one laid-out file.  One row per setting and direction."""
    rows = []
    with BenchFile(directory, total_bytes, chunk_bytes) as bench:
        for bs in block_sizes:
            for qd in queue_depths:
                setting = {"backend": backend, "block_size": bs, "queue_depth": qd, "threads": 1}
                for op in ("write", "read"):
                    r = compare_with_fio(directory, op, setting, total_bytes, chunk_bytes, repeats, bench.path)
                    rows.append({"op": op, **setting, **r})
                    if progress:
                        progress(f"fio grid {op} block={bs // MiB}MiB qd={qd}")
    return rows
