"""Speculation's read-ahead during backward: this round's against the round before, paired.

With ``step_speculation`` (hetmem/speculation.py) backward updates the last layers' chunk groups
as their gradients complete, reading their master weights and Adam moments from NVMe ahead of
backward's order.  Two settings of that read-ahead:

  now      the next group's reads make room; the read-ahead + 1 groups after it are read once
           they fit 0.9 of host_budget, and when they do not, the stores that make that room
           are started at once (Adam state of groups updated already or far from backward's
           reach) and a later moment reads them
  before   the round before's settings: the read-ahead groups after the next one only within
           0.75 of host_budget, no room made for them (in this round's code, which reads such a
           group whole or not at all; the round before's could read part of one)

Two engines (the same model, config and batches; state on NVMe in DIR, device 64 MiB, the GPT of
``nvme_train.py``: 151.5M parameters, bf16, batch 2 x 128, activation checkpointing, the
overlapped step) are stepped in turn, alternating which goes first, on the same batches.  Figures:
medians over the steps of the iteration (forward + backward + step), of the paired ratio
now / before, of the groups updated during backward and of the swap bytes per iteration.

    python benchmarks/speculation_read_ahead.py DIR [--host-budget 384MiB] [--steps 6] [--rounds 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

if __name__ == "__main__" and not __package__:  # run as a file: use this checkout's hetmem
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (read_share, extra_read_ahead, room_ahead) of hetmem.speculation.Speculation
VARIANTS = {"now": None, "before": (0.75, 0, False)}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir", help="a folder on the disk to test (swap files are created and removed there)")
    p.add_argument("--host-budget", default="384MiB")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="batches per round (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=2, help="passes over the batches")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if min(args.steps, args.rounds, args.d_model, args.layers, args.block_size) < 1:
        p.error("--steps, --rounds, --d-model, --layers and --block-size must be >= 1")
    from hetmem._core.units import parse_size

    try:
        parse_size(args.host_budget, key="--host-budget")
    except ValueError as exc:
        p.error(str(exc))
    return args


def _engine(args, name: str, folder: str):
    import hetmem
    from hetmem.benchmarks.nvme_train import gpt_config
    from hetmem.models.gpt import GPT

    cfg = gpt_config(args)
    config = hetmem.Config(device="cpu", device_budget="64MiB", host_budget=args.host_budget, dtype="bf16",
                           nvme_dir=folder, memory_trace=False, optimizer=hetmem.AdamConfig(lr=1e-4, weight_decay=0.1))
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(cfg)
    engine = hetmem.initialize(model, config, init_fn=model.init_weights)
    speculation = engine.adam.speculation
    if speculation.mode is None:
        raise SystemExit("speculation is off in this configuration (it needs the NVMe tier and the overlapped step)")
    if VARIANTS[name] is not None:
        speculation.read_share, speculation.extra_read_ahead, speculation.room_ahead = VARIANTS[name]
    return engine


def _swap_bytes(engine) -> int:
    stats = engine.manager.nvme.swap.stats
    return stats["loaded_bytes"] + stats["stored_bytes"]


def run(args) -> dict:
    from hetmem.corpus import load_corpus, random_batch

    data = load_corpus()
    gen = torch.Generator().manual_seed(0)
    batches = [random_batch(data, 2, args.block_size, gen) for _ in range(args.steps + 1)]
    root = Path(args.dir) / "hetmem-speculation-read-ahead"
    engines = {}
    figures = {name: {"iteration_s": [], "speculated": [], "swap_bytes": []} for name in VARIANTS}
    try:
        for name in VARIANTS:
            engines[name] = _engine(args, name, str(root / name))
            engine = engines[name]
            engine.backward(engine(*batches[0]))  # the warm-up
            engine.step()
        order = list(VARIANTS)
        for r in range(args.rounds):
            for n, (x, y) in enumerate(batches[1:]):
                for name in (order if (n + r) % 2 == 0 else order[::-1]):
                    engine = engines[name]
                    moved = _swap_bytes(engine)
                    start = time.perf_counter()
                    engine.backward(engine(x, y))
                    engine.step()
                    figures[name]["iteration_s"].append(time.perf_counter() - start)
                    figures[name]["speculated"].append(engine.adam.speculation.last_speculated)
                    figures[name]["swap_bytes"].append(_swap_bytes(engine) - moved)
        groups = len([g for g in engines["now"].adam.layout.groups if g.trainable])
    finally:
        for engine in engines.values():
            engine.close(keep_weights=False)
        shutil.rmtree(root, ignore_errors=True)
    now, before = figures["now"]["iteration_s"], figures["before"]["iteration_s"]
    return {
        "benchmark": "speculation_read_ahead",
        "config": {"host_budget": args.host_budget, "d_model": args.d_model, "layers": args.layers,
                   "block_size": args.block_size, "steps": args.steps, "rounds": args.rounds, "dtype": "bf16",
                   "device_budget": "64MiB", "trainable_groups": groups, "load_average": os.getloadavg()[0]},
        "variants": {name: {"iteration_s": statistics.median(f["iteration_s"]),
                            "iteration_range_s": [min(f["iteration_s"]), max(f["iteration_s"])],
                            "speculated_groups": statistics.median(f["speculated"]),
                            "swap_bytes": statistics.median(f["swap_bytes"])} for name, f in figures.items()},
        "paired_now_over_before": statistics.median(a / b for a, b in zip(now, before)),
        "paired_range": [min(a / b for a, b in zip(now, before)), max(a / b for a, b in zip(now, before))],
        "pairs": len(now),
    }


def table(result: dict) -> str:
    cfg = result["config"]
    lines = [f"speculation's read-ahead: GPT d_model {cfg['d_model']} x {cfg['layers']} layers, bf16, host budget "
             f"{cfg['host_budget']}, device {cfg['device_budget']}; two engines stepped in turn, medians of "
             f"{result['pairs']} steps each (load average {cfg['load_average']:.1f})"]
    for name, v in result["variants"].items():
        low, high = v["iteration_range_s"]
        lines.append(f"  {name:7s} iteration {v['iteration_s']:.2f} s ({low:.2f}-{high:.2f}); "
                     f"{v['speculated_groups']:g} of {cfg['trainable_groups']} groups updated during backward; "
                     f"{v['swap_bytes'] / 1e9:.2f} GB swapped per iteration")
    low, high = result["paired_range"]
    lines.append(f"now / before, paired: {result['paired_now_over_before']:.3f} ({low:.3f}-{high:.3f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = run(args)
    except ValueError as exc:  # a configuration the engine refuses: its message names the fix
        print(f"speculation_read_ahead.py: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
