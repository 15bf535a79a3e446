"""The NVMe step pipeline's derived shape against fixed ones, in one run (hetmem/nvme/pipeline_plan.py).

The GPT of benchmarks/nvme_train.py (151.5M parameters by default, bf16, activation checkpointing)
trains with its optimizer state on NVMe in several engines at once, one per variant, each with its
own swap folder:

- ``auto``: ``chunk_size`` and ``nvme_pipeline_depth`` "auto" (the unit sized for the host budget
  and the disk, the depth derived from the measured steps);
- ``old``: the previous defaults: the chunk capacity the device budget alone chose (what "auto" was
  before units were sized for the disk), depth 1, and no room made ahead (``nvme_spill_ahead`` 0);
- fixed variants given with ``--variant LABEL:CHUNK:DEPTH[:SPILL]`` (SPILL: ``nvme_spill_ahead``,
  default its default; default variants: the old capacity at depth 2, and 2M elements at depth 1,
  neither making room ahead: the choices the README measured before).

After a warm-up step each, the engines step in turn on the same batches, the order rotating every
round, so a change in machine load hits every variant.  Per variant: the median s/step
(forward + backward + step), its ratio to ``--baseline`` (default ``old``) paired step by step, and
the same ratio for ``engine.step()`` alone ("opt s"), the bytes moved per step
(all transfers; and NVMe reads + writes), the plan (groups, unit, depth and why), and the load
average over the run.  The overlapped step is off (``--overlap on`` turns it on) so the step's own
pipeline is what differs.

    python benchmarks/nvme_pipeline_plan.py [--rounds 4] [--host-budget 384MiB] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: import hetmem from it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import hetmem
from hetmem.chunk_manager.sizing import choose_capacity
from hetmem.corpus import load_corpus, random_batch
from hetmem.device import resolve_budgets, resolve_device
from hetmem.engine import CHUNKS_PER_BUDGET
from hetmem.layout import collect_parameters
from hetmem.benchmarks.nvme_train import add_model_arguments, gpt_config
from hetmem.models.gpt import GPT, GPTConfig
from hetmem.nvme.pipeline_plan import MAX_SPILL_AHEAD, SPILL_AHEAD, check_spill_ahead
from hetmem.units import format_bytes

DEFAULT_VARIANTS = ("old-depth2:old:2:0", "2M-depth1:2097152:1:0")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p, "folder for the swap spaces (default: a temporary folder)")
    p.add_argument("--rounds", type=int, default=4, help="steps of every variant after the warm-up step")
    p.add_argument("--overlap", choices=("on", "off"), default="off", help="overlap_step for every variant")
    p.add_argument("--variant", action="append", default=None, metavar="LABEL:CHUNK:DEPTH[:SPILL]",
                   help="a fixed variant: CHUNK elements ('old': the device budget's capacity), DEPTH and "
                        "SPILL (nvme_spill_ahead, default its default) (repeatable; default: "
                        f"{' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--baseline", default="old", help="the variant the ratios compare with (default: old)")
    p.add_argument("--json", action="store_true")
    return p


def old_capacity(cfg: GPTConfig, config: hetmem.Config) -> int:
    """The chunk capacity "auto" chose from the device budget alone (before units were sized for the disk)."""
    with torch.device("meta"):
        model = GPT(cfg)
    numels = [s.numel for s in collect_parameters(model)[0]]
    usable = resolve_budgets(config, resolve_device(config)).usable
    return choose_capacity(numels, max_elements=max(4096, usable // (CHUNKS_PER_BUDGET * config.param_bytes)))


def parse_variant(text: str, old: int) -> tuple[str, int | str, int | str, int]:
    try:
        label, chunk, depth, *spill = text.split(":")
        if len(spill) > 1:
            raise ValueError(text)
        spill = int(spill[0]) if spill else SPILL_AHEAD
        check_spill_ahead(spill)
        return (label, old if chunk == "old" else (chunk if chunk == "auto" else int(chunk)),
                depth if depth == "auto" else int(depth), spill)
    except ValueError:
        raise ValueError(f"--variant {text!r}: give LABEL:CHUNK:DEPTH[:SPILL], CHUNK elements, 'old' or 'auto', "
                         f"DEPTH an int >= 1 or 'auto', SPILL an int from 0 to {MAX_SPILL_AHEAD} (e.g. old-depth2:old:2 or "
                         f"auto-nospill:auto:auto:0)") from None


def measure(args, progress=None) -> dict:
    root = args.dir or tempfile.mkdtemp(prefix="hetmem-pipeline-plan-")
    cfg = gpt_config(args)
    base = hetmem.Config(device="cpu", device_budget=args.device_budget, host_budget=args.host_budget,
                         nvme_dir=root, dtype=args.dtype, memory_trace=False, overlap_step=args.overlap == "on",
                         optimizer=hetmem.AdamConfig(lr=1e-4, weight_decay=0.1))
    old = old_capacity(cfg, base)
    variants = [("auto", "auto", "auto", SPILL_AHEAD), ("old", old, 1, 0)]
    variants += [parse_variant(v, old) for v in (args.variant or DEFAULT_VARIANTS)]
    labels = [v[0] for v in variants]
    if len(set(labels)) != len(labels) or args.baseline not in labels:
        raise ValueError(f"variant labels must be unique and --baseline={args.baseline!r} one of them "
                         f"({', '.join(labels)})")
    data = load_corpus()
    gen = torch.Generator().manual_seed(0)
    batches = [random_batch(data, args.batch_size, args.block_size, gen) for _ in range(args.rounds + 1)]
    load_before = os.getloadavg()
    engines, rows = {}, {label: [] for label in labels}
    try:
        for label, chunk, depth, spill in variants:
            with torch.device("meta"):
                model = GPT(cfg)
            config = base.replace(chunk_size=chunk, nvme_pipeline_depth=depth, nvme_spill_ahead=spill,
                                  nvme_dir=os.path.join(root, label))
            engines[label] = hetmem.initialize(model, config, init_fn=model.init_weights)
            record(rows[label], step(engines[label], *batches[0]))  # the warm-up step
            if progress:
                progress(f"{label}: warm-up {rows[label][-1]['seconds']:.1f} s, depth {engines[label].nvme_plan.depth}")
        for r, (x, y) in enumerate(batches[1:]):
            order = [v[0] for v in variants]
            order = order[r % len(order):] + order[:r % len(order)]
            for label in order:
                record(rows[label], step(engines[label], x, y, finish=r == args.rounds - 1))
            if progress:
                progress(f"round {r + 1}: " + ", ".join(f"{k} {rows[k][-1]['seconds']:.1f} s" for k in order))
        plans = {label: plan_of(engine) for label, engine in engines.items()}
    finally:
        for engine in engines.values():
            engine.close(keep_weights=False)
    load_after = os.getloadavg()
    steady = {label: r[1:] for label, r in rows.items()}
    results, base_rows = {}, steady[args.baseline]
    for label, chunk, depth, spill in variants:
        s = steady[label]
        results[label] = {
            "chunk_size": chunk, "nvme_pipeline_depth": depth, "nvme_spill_ahead": spill, **plans[label],
            "step_s_median": statistics.median(x["seconds"] for x in s),
            "ratio_to_baseline_median": statistics.median(a["seconds"] / b["seconds"] for a, b in zip(s, base_rows)),
            "optimizer_ratio_to_baseline_median": statistics.median(a["optimizer_s"] / b["optimizer_s"]
                                                                    for a, b in zip(s, base_rows)),
            "moved_bytes_per_step": statistics.median(x["moved_bytes"] for x in s),
            "nvme_bytes_per_step": statistics.median(x["nvme_bytes"] for x in s),
            "optimizer_s_median": statistics.median(x["optimizer_s"] for x in s),
            "optimizer_io_wait_s_median": statistics.median(x["optimizer_io_wait_s"] for x in s),
            "steps": rows[label],
        }
    return {"benchmark": "nvme_pipeline_plan",
            "config": {"d_model": args.d_model, "layers": args.layers, "batch_size": args.batch_size,
                       "block_size": args.block_size, "dtype": args.dtype, "device_budget": args.device_budget,
                       "host_budget": args.host_budget, "overlap_step": args.overlap, "rounds": args.rounds,
                       "baseline": args.baseline},
            "load_average": {"before": load_before, "after": load_after, "cpus": os.cpu_count()},
            "variants": results}


def step(engine, x, y, finish: bool = True) -> tuple[dict, object]:
    """One forward + backward + step: its row (seconds, bytes moved: all transfers, and NVMe;
    the optimizer's figures) and the previous step's result (``StepResult``, finished by this
    backward).

    An overlapped step (``--overlap on``) is left pending unless ``finish`` (the last round):
    ``engine.last_step`` would finish it at once.  Its rest is then applied, and timed, in the
    next forward, and its optimizer figures are None until the next step's backward finishes it
    (``record`` fills them in)."""
    stats = engine.manager.nvme.swap.stats
    moved, nvme = engine.manager.moved_bytes, stats["loaded_bytes"] + stats["stored_bytes"]
    t0 = time.perf_counter()
    engine.backward(engine(x, y))
    previous = engine.adam.last_result
    engine.step()
    own = engine.last_step if finish or engine.adam.pending is None else None
    row = {"seconds": time.perf_counter() - t0, "moved_bytes": engine.manager.moved_bytes - moved,
           "nvme_bytes": stats["loaded_bytes"] + stats["stored_bytes"] - nvme,
           "optimizer_s": None if own is None else own.seconds,
           "optimizer_io_wait_s": None if own is None else own.io_wait_s, "depth": engine.nvme_plan.depth}
    return row, previous


def record(rows: list[dict], taken: tuple[dict, object]) -> None:
    """Append a step's row; an overlapped step before it gets its optimizer figures now."""
    row, previous = taken
    if rows and rows[-1]["optimizer_s"] is None and previous is not None:
        rows[-1]["optimizer_s"], rows[-1]["optimizer_io_wait_s"] = previous.seconds, previous.io_wait_s
    rows.append(row)


def plan_of(engine) -> dict:
    plan = engine.nvme_plan
    return {"groups": len(engine.layout.groups), "capacity_elements": engine.layout.chunk_elements,
            "group_bytes": plan.group_bytes, "depth": plan.depth, "reason": plan.reason}


def table(r: dict) -> str:
    c, load = r["config"], r["load_average"]
    lines = [f"GPT d_model {c['d_model']} x {c['layers']} layers, {c['dtype']}, batch {c['batch_size']}x"
             f"{c['block_size']}; device {c['device_budget']}, host {c['host_budget']}, "
             f"overlap_step {c['overlap_step']}; "
             f"{c['rounds']} rounds after the warm-up; load average {load['before'][0]:.1f} -> {load['after'][0]:.1f} "
             f"on {load['cpus']} CPUs",
             f"{'variant':<12} {'groups':>6} {'capacity':>10} {'unit':>10} {'depth':>5} {'spill':>5} {'s/step':>7} "
             f"{'vs ' + c['baseline']:>7} {'moved/step':>11} {'NVMe/step':>10} {'opt s':>6} {'opt vs':>6} "
             f"{'opt wait':>8}"]
    for label, v in r["variants"].items():
        lines.append(f"{label:<12} {v['groups']:>6} {v['capacity_elements']:>10,} {format_bytes(v['group_bytes']):>10} "
                     f"{v['depth']:>5} {v['nvme_spill_ahead']:>5} {v['step_s_median']:>7.2f} "
                     f"{v['ratio_to_baseline_median']:>7.3f} "
                     f"{v['moved_bytes_per_step'] / 1e9:>9.2f}GB {v['nvme_bytes_per_step'] / 1e9:>8.2f}GB "
                     f"{v['optimizer_s_median']:>6.2f} {v['optimizer_ratio_to_baseline_median']:>6.3f} "
                     f"{v['optimizer_io_wait_s_median']:>8.2f}")
    lines.append(f"auto's depth: {r['variants']['auto']['reason']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = None if args.json else (lambda msg: print("  " + msg, file=sys.stderr, flush=True))
    result = measure(args, progress)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
