"""Activation offload: step time with saved activations moved to host memory, against without.

One GPT, one batch stream, three engines measured in the same run, interleaved step by step
(the order rotates) so machine noise hits them alike; figures are medians over the steps after
the warm-up:

- off: ``activation_offload="off"`` at a device budget where it runs (the floor without
  offload from ``hetmem.profile``, plus 5%);
- offload, same budget: the same budget, with the plan made for the small budget below, so
  the same activations move as there while chunks are placed as by "off" (the cost of the
  copies and bookkeeping alone);
- offload, small budget: ``activation_offload="auto"`` at a device budget below the floor
  without offload (default: the floor with offload plus 25% of the gap), where "off" cannot
  train at all.

The ratios are medians of the paired per-step ratios (offload / off).  On the CPU the "device"
and the host are the same memory, so a copy costs a memcpy and the figure is the bookkeeping
and copy overhead; on a GPU the copies overlap compute on a side stream.

    python benchmarks/activation_offload.py [--json]      (also: hetmem bench activations)
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: import hetmem from it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import hetmem
from hetmem.corpus import load_corpus, random_batch
from hetmem.models.gpt import GPT, GPTConfig

CONTENDERS = ("off", "offload_same_budget", "offload_small_budget")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--share", type=float, default=0.25,
                   help="small budget = floor with offload + SHARE x (floor without - floor with)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json", action="store_true")
    return p


def measure(args) -> dict:
    cfg = GPTConfig(block_size=args.block_size, n_layer=args.layers, n_head=args.heads, d_model=args.d_model)
    torch.manual_seed(0)
    base = GPT(cfg)
    corpus = load_corpus()
    gen = torch.Generator().manual_seed(0)
    batches = [random_batch(corpus, args.batch_size, args.block_size, gen) for _ in range(args.steps + 2)]
    profile = hetmem.profile(base, batches[0], dtype="fp32", device="cpu")
    high = int(profile.min_device_budget * 1.05)
    low = int(profile.min_device_budget_offload
              + args.share * (profile.min_device_budget - profile.min_device_budget_offload))

    def engine(budget: int, mode: str):
        return hetmem.initialize(copy.deepcopy(base), hetmem.Config(
            device="cpu", dtype="fp32", device_budget=budget, chunk_size=profile.chunk_elements,
            activation_offload=mode, optimizer=hetmem.AdamConfig(lr=1e-4)))

    engines = {"off": engine(high, "off"), "offload_same_budget": engine(high, "auto"),
               "offload_small_budget": engine(low, "auto")}
    engines["offload_same_budget"].activations.plan_usable = low
    times = {name: [] for name in CONTENDERS}
    for i, (x, y) in enumerate(batches):
        order = CONTENDERS[i % 3:] + CONTENDERS[:i % 3]
        for name in order:
            e = engines[name]
            started = time.perf_counter()
            e.backward(e(x, y))
            e.step()
            if i >= 2:  # after the warm-up
                times[name].append(time.perf_counter() - started)
    tokens = args.batch_size * args.block_size
    result = {"benchmark": "activation_offload",
              "config": {"d_model": args.d_model, "layers": args.layers, "block_size": args.block_size,
                         "batch_size": args.batch_size, "dtype": "fp32", "steps": args.steps},
              "budgets": {"floor_without_offload": profile.min_device_budget,
                          "floor_with_offload": profile.min_device_budget_offload,
                          "same": high, "small": low},
              "step_s": {name: statistics.median(times[name]) for name in CONTENDERS},
              "tokens_per_s": {name: tokens / statistics.median(times[name]) for name in CONTENDERS},
              "ratio_vs_off": {name: statistics.median(a / b for a, b in zip(times[name], times["off"]))
                               for name in CONTENDERS[1:]}}
    per_step = {}
    for name in CONTENDERS:  # medians over the steady steps the recorder kept
        steps = [s for s in engines[name].recorder.steps if not s["warmup"]]
        row = {"device_peak": engines[name].scheduler.peak_total,
               "chunk_moves": statistics.median(len(s["moves"]) for s in steps)}
        if name != "off":
            for key in ("offloaded_bytes", "restored_bytes", "late_restores", "wait_s"):
                row[key] = statistics.median(s["activations"][key] for s in steps)
        per_step[name] = row
    result["per_step"] = per_step
    for e in engines.values():
        e.close()
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    b, s, r = result["budgets"], result["step_s"], result["ratio_vs_off"]
    mib = 1 << 20
    print(f"floors: {b['floor_without_offload'] / mib:.2f} MiB without activation offload, "
          f"{b['floor_with_offload'] / mib:.2f} MiB with it")
    print(f"off at {b['same'] / mib:.2f} MiB: {s['off'] * 1e3:.1f} ms/step")
    for name, label in (("offload_same_budget", f"offload at {b['same'] / mib:.2f} MiB"),
                        ("offload_small_budget", f"offload at {b['small'] / mib:.2f} MiB")):
        last = result["per_step"][name]
        print(f"{label}: {s[name] * 1e3:.1f} ms/step, {r[name]:.3f}x the time of off (median of paired "
              f"ratios); {last['offloaded_bytes'] / mib:.2f} MiB offloaded and {last['restored_bytes'] / mib:.2f} "
              f"MiB restored per step, compute waited {last['wait_s'] * 1e3:.1f} ms on them (medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
