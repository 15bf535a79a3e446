"""NVMe swap benchmark: how fast chunks move between host memory and a disk folder.

    python benchmarks/nvme_swap.py --dir /nvme/scratch [--chunk 64MiB] [--total 2GiB]
        [--quick] [--json] [--write-config io.json] [--fio]
    hetmem bench nvme --dir /nvme/scratch ...

In one run: a plain single-threaded buffered pwrite/pread baseline; a sweep of backend x
block size x queue depth x threads, each writing then reading ``--total`` bytes as
``--chunk``-sized tensors through AsyncFile with O_DIRECT; the best settings measured
again (medians); a mixed run with reads and writes in flight at once (as the pipelined
optimizer step does); and, with ``--fio``, fio at the best settings for comparison.
``--write-config F`` writes the recommended setting with the ``nvme_*`` keys the runtime
reads (``hetmem.nvme.load_io_config``).  All scratch files are removed at the end.

On a virtual machine the absolute figures can move between runs by 2x or more: the host
disk drifts, and direct IO speed depends on which memory the buffers land in (see
hetmem/nvme/fio_compare.py).  Settings are compared within one run, on the same buffers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: import hetmem from it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MiB = 1 << 20
GB = 1e9


def _sizes(text: str) -> list[int]:
    from hetmem.units import parse_size

    return [parse_size(v.strip(), key="size") for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetmem bench nvme", description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=tempfile.gettempdir(),
                   help="folder on the disk to measure (default: %(default)s); give your nvme_dir")
    p.add_argument("--chunk", default="64MiB", help="bytes per tensor (one request each; default %(default)s)")
    p.add_argument("--total", default="2GiB", help="bytes per pass (default %(default)s; >= 2GiB for steady figures)")
    p.add_argument("--quick", action="store_true",
                   help="reduced sweep: block 1,8 MiB x queue depth 4,32 x 1 thread, 1 GiB per pass")
    p.add_argument("--backends", default=None, help="comma list (default: every engine backend that works here)")
    p.add_argument("--block-sizes", default=None, help="comma list of sizes (default 1MiB,4MiB,8MiB)")
    p.add_argument("--queue-depths", default=None, help="comma list (default 1,4,16,32)")
    p.add_argument("--threads", default=None, help="comma list (default 1,2)")
    p.add_argument("--fio", action="store_true",
                   help="also compare with fio (if installed) at the best settings, interleaved on the same file")
    p.add_argument("--fio-grid", action="store_true",
                   help="also compare with fio at every block size x queue depth of the sweep (1 thread)")
    p.add_argument("--fio-repeats", type=int, default=3, help="interleaved repeats of each fio comparison")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--write-config", metavar="F", default=None,
                   help="write the recommended setting as JSON with the nvme_* config keys")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _sweep_args(args) -> dict:
    from hetmem.units import parse_size

    chunk = parse_size(args.chunk, key="--chunk")
    total = parse_size(args.total, key="--total") if not (args.quick and args.total == "2GiB") else 1 << 30
    total -= total % chunk
    sweep = {
        "total_bytes": total, "chunk_bytes": chunk,
        "block_sizes": (MiB, 8 * MiB) if args.quick else (MiB, 4 * MiB, 8 * MiB),
        "queue_depths": (4, 32) if args.quick else (1, 4, 16, 32),
        "threads": (1,) if args.quick else (1, 2),
        "confirm_top": 1 if args.quick else 3,
        "confirm_repeats": 2,
    }
    if args.backends:
        sweep["backends"] = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.block_sizes:
        sweep["block_sizes"] = tuple(_sizes(args.block_sizes))
    if args.queue_depths:
        sweep["queue_depths"] = tuple(_ints(args.queue_depths))
    if args.threads:
        sweep["threads"] = tuple(_ints(args.threads))
    return sweep


def _steps(sweep: dict, n_backends: int) -> int:
    grid = n_backends * len(sweep["block_sizes"]) * len(sweep["queue_depths"]) * len(sweep["threads"])
    return 1 + grid + 2 * sweep["confirm_top"] + 2


def checksum_cost(directory: str, recommended: dict, total_bytes: int, chunk_bytes: int, repeats: int) -> dict:
    """The checksum's own speed, and SwapSpace store/load with it off and on (interleaved)."""
    from hetmem.nvme.bench import measure_checksum, measure_swap

    setting = {k[len("nvme_"):]: v for k, v in recommended.items()}
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(repeats):
        for state in ("off", "on"):
            runs[state].append(measure_swap(directory, total_bytes=total_bytes, chunk_bytes=chunk_bytes,
                                            checksum=state == "on", **setting))
    swap = {state: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "buffer_kind"}
            | {"buffer_kind": rs[0]["buffer_kind"]} for state, rs in runs.items()}
    return {"checksum": measure_checksum(chunk_bytes), "swap": swap, "repeats": repeats}


def _fmt_setting(s: dict) -> str:
    return f"{s['backend']} threads={s['threads']} block={s['block_size'] // MiB}MiB qd={s['queue_depth']}"


def format_table(report: dict) -> str:
    from hetmem.units import format_bytes

    kind = f"[{report['buffer_kind']}]"  # the buffers' kind, next to every figure
    lines = [f"hetmem NVMe swap benchmark on {report['directory']}: {format_bytes(report['chunk_bytes'])} chunks, "
             f"{format_bytes(report['total_bytes'])} per pass, "
             f"{'O_DIRECT' if report['o_direct'] else 'buffered (O_DIRECT refused; figures include fsync)'}, "
             f"buffers {report['buffer_kind']} (the NVMe tier's IO pool kind)"]
    base = report["baseline"]
    lines.append(f"baseline, single-threaded buffered os.pwrite+fsync / os.preadv (cache dropped with "
                 f"posix_fadvise): write {base['write_bytes_per_s'] / GB:.2f} GB/s, "
                 f"read {base['read_bytes_per_s'] / GB:.2f} GB/s [{base['buffer_kind']}]")
    lines.append("")
    lines.append(f"{'backend':10s} {'threads':>7s} {'block':>6s} {'qd':>3s}  {'write GB/s':>10s} {'read GB/s':>10s}"
                 f" {'CPU ms/GB':>10s}  {kind}")
    for e in report["results"]:
        w = f"{e['write_median'] / GB:.2f}" + (f" ({len(e['write'])})" if len(e["write"]) > 1 else "")
        r = f"{e['read_median'] / GB:.2f}" + (f" ({len(e['read'])})" if len(e["read"]) > 1 else "")
        lines.append(f"{e['backend']:10s} {e['threads']:7d} {e['block_size'] // MiB:4d}Mi {e['queue_depth']:3d}  "
                     f"{w:>10s} {r:>10s} {e['cpu_seconds_per_gb'] * 1e3:10.1f}")
    lines.append("(n) = median of n passes; CPU = this process's CPU time (all threads) per GB moved")
    lines.append("")
    for op in ("write", "read"):
        b = report["best"][op]
        ratio = b["bytes_per_s"] / base[f"{op}_bytes_per_s"]
        lines.append(f"best {op:5s}: {_fmt_setting(b)}: {b['bytes_per_s'] / GB:.2f} GB/s {kind} "
                     f"(median of {b['samples']}), {ratio:.1f}x the baseline")
        fio = report.get("fio", {}).get(op)
        if isinstance(fio, dict):
            m = fio["median"]
            lines.append(f"    vs fio (same file and memory, fio's request pattern, shuffled rounds, median of "
                         f"{len(fio['samples']['hetmem'])}): hetmem "
                         f"{m['hetmem'] / GB:.2f}, fio io_uring {m['fio io_uring'] / GB:.2f}, fio libaio "
                         f"{m['fio libaio'] / GB:.2f} GB/s [{fio['buffer_kind']}]; hetmem/fio = "
                         f"{m['hetmem'] / max(m['fio io_uring'], m['fio libaio']):.2f} (of the better fio engine)")
        elif fio:
            lines.append(f"    fio: {fio}")
    fio = report.get("fio", {}).get("mixed")
    if isinstance(fio, dict):
        m = fio["median"]
        parts = [f"{k} {v['read'] / GB:.2f} + {v['write'] / GB:.2f} = {v['total'] / GB:.2f}" for k, v in m.items()]
        lines.append(f"mixed vs fio (read + write GB/s, same file and memory, shuffled rounds, median of "
                     f"{len(fio['samples']['hetmem'])}, setting {_fmt_setting(fio['setting'])}, "
                     f"[{fio['buffer_kind']}]): " + "; ".join(parts))
    elif fio:
        lines.append(f"mixed vs fio: {fio}")
    for m in report["mixed"]:
        lines.append(f"mixed (reads and writes in flight at once, best {m['best_for']} setting "
                     f"{_fmt_setting(m)}): read {m['read_bytes_per_s'] / GB:.2f} + write "
                     f"{m['write_bytes_per_s'] / GB:.2f} = {m['total_bytes_per_s'] / GB:.2f} GB/s "
                     f"[{m['buffer_kind']}]")
    ratios = report["small_block_ratio"]
    if ratios:
        parts = [f"{b} write {r.get('write', float('nan')):.2f} read {r.get('read', float('nan')):.2f}"
                 for b, r in ratios.items()]
        lines.append(f"1 MiB @ qd32 / best 8 MiB (1 thread) {kind}: " + "; ".join(parts))
    lines.append(f"recommended setting (highest mixed total): {json.dumps(report['recommended'])}")
    grid = report.get("fio_grid")
    if isinstance(grid, list) and grid:
        lines.append("")
        lines.append(f"fio side by side ({grid[0]['setting']['backend']} backend, 1 thread; same file and memory, "
                     f"fio's request pattern, shuffled rounds, median of {len(grid[0]['samples']['hetmem'])}), GB/s "
                     f"[{grid[0]['buffer_kind']}]:")
        lines.append(f"{'op':5s} {'block':>6s} {'qd':>3s} {'hetmem':>7s} {'fio io_uring':>12s} {'fio libaio':>10s} "
                     f"{'hetmem/best fio':>15s}")
        for row in grid:
            m = row["median"]
            best_fio = max(m["fio io_uring"], m["fio libaio"])
            lines.append(f"{row['op']:5s} {row['block_size'] // MiB:4d}Mi {row['queue_depth']:3d} {m['hetmem'] / GB:7.2f} "
                         f"{m['fio io_uring'] / GB:12.2f} {m['fio libaio'] / GB:10.2f} {m['hetmem'] / best_fio:15.2f}")
        lines.append(f"fio command: {next(iter(grid[0]['commands'].values()))}")
    elif grid:
        lines.append(f"fio grid: {grid}")
    c = report.get("checksum")
    if c:
        off, on = c["swap"]["off"], c["swap"]["on"]
        lines.append(f"checksum {c['checksum']['algorithm']} ({c['checksum']['implementation']}): "
                     f"{c['checksum']['bytes_per_s'] / GB:.1f} GB/s on one core; SwapSpace at the recommended setting, "
                     f"off -> on (median of {c['repeats']}): store {off['store_bytes_per_s'] / GB:.2f} -> "
                     f"{on['store_bytes_per_s'] / GB:.2f} GB/s, load {off['load_bytes_per_s'] / GB:.2f} -> "
                     f"{on['load_bytes_per_s'] / GB:.2f} GB/s (first store into fresh swap: "
                     f"{off['first_store_bytes_per_s'] / GB:.2f} GB/s) [{on['buffer_kind']}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.dir):
        print(f"--dir {args.dir!r} is not a folder", file=sys.stderr)
        return 2
    from hetmem.nvme.bench import run_sweep
    from hetmem.nvme.config import IOConfig, write_io_config
    from hetmem.nvme.probe import probe_io

    sweep = _sweep_args(args)
    probe = probe_io(args.dir)
    n_backends = len([b for b in sweep.get("backends", ("io_uring", "linux_aio", "threads")) if probe.get(b) == "ok"])
    if n_backends == 0:
        print(f"note: no engine backend works here ({probe}); measuring the python_threads fallback",
              file=sys.stderr)
    bar = None
    if not args.no_progress and not args.json:
        from tqdm import tqdm

        bar = tqdm(total=_steps(sweep, max(n_backends, 1)), desc="nvme sweep", unit="run", file=sys.stderr)
    progress = (lambda label: (bar.set_postfix_str(label, refresh=False), bar.update(1))) if bar else None
    try:
        report = run_sweep(args.dir, progress=progress, **sweep)
    finally:
        if bar is not None:
            bar.close()
    if args.fio:
        report["fio"] = {}
        for op in ("write", "read", "mixed"):
            source = report["best"][op] if op != "mixed" else report["recommended"]
            keys = ("backend", "block_size", "queue_depth", "threads")
            setting = {k: source[k] if op != "mixed" else source[f"nvme_{k}"] for k in keys}
            if shutil.which("fio") is None:
                report["fio"][op] = "fio is not installed"
                continue
            try:
                from hetmem.nvme.fio_compare import compare_with_fio

                report["fio"][op] = compare_with_fio(args.dir, op, setting, sweep["total_bytes"], sweep["chunk_bytes"],
                                                     repeats=args.fio_repeats)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                report["fio"][op] = str(exc)
    if args.fio_grid:
        from hetmem.nvme.fio_compare import fio_grid

        if shutil.which("fio") is None:
            report["fio_grid"] = "fio is not installed"
        else:
            report["fio_grid"] = fio_grid(args.dir, total_bytes=sweep["total_bytes"], chunk_bytes=sweep["chunk_bytes"],
                                          block_sizes=sweep["block_sizes"], queue_depths=sweep["queue_depths"],
                                          repeats=args.fio_repeats)
    report["checksum"] = checksum_cost(args.dir, report["recommended"], sweep["total_bytes"], sweep["chunk_bytes"],
                                       repeats=1 if args.quick else 3)
    if args.write_config:
        write_io_config(args.write_config, IOConfig.from_dict(report["recommended"]))
        report["config_written"] = args.write_config
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
        if args.write_config:
            print(f"wrote {args.write_config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
