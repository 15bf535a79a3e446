"""Cost of recording the memory trace (config memory_trace=True) on the training step.

The same model, data and budget, trained with the trace on and off, interleaved step by step
(on, off, on, off, ...) so machine noise hits both alike; the figure is the median of the
paired step-time ratios.  The goal is < 3% of step time.

    python benchmarks/trace_overhead.py [--json]      (also: hetmem bench trace)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16")
    p.add_argument("--device-budget", default="8MiB", help="small enough that chunks move every step")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json", action="store_true")
    return p


def measure(args) -> dict:
    cfg = GPTConfig(block_size=args.block_size, n_layer=args.layers, n_head=4, d_model=args.d_model, checkpoint=True)
    torch.manual_seed(0)
    base = GPT(cfg)
    engines = {}
    for trace in (True, False):
        engines[trace] = hetmem.initialize(copy.deepcopy(base), hetmem.Config(
            device="cpu", device_budget=args.device_budget, dtype=args.dtype, memory_trace=trace))
    data = load_corpus()
    gen = torch.Generator().manual_seed(0)
    batches = [random_batch(data, args.batch_size, args.block_size, gen) for _ in range(args.steps + 2)]
    times = {True: [], False: []}
    for i, (x, y) in enumerate(batches):
        for trace in ((True, False) if i % 2 else (False, True)):
            engine = engines[trace]
            started = time.perf_counter()
            engine.backward(engine(x, y))
            engine.step()
            if i >= 2:  # after warm-up
                times[trace].append(time.perf_counter() - started)
    ratios = [on / off for on, off in zip(times[True], times[False])]
    moves = len(engines[True].recorder.steps[-1]["moves"])
    return {"benchmark": "trace_overhead",
            "config": {"d_model": args.d_model, "layers": args.layers, "dtype": args.dtype,
                       "device_budget": args.device_budget, "steps": args.steps},
            "step_s": {"trace_on": statistics.median(times[True]), "trace_off": statistics.median(times[False])},
            "overhead": statistics.median(ratios) - 1.0, "moves_per_step": moves,
            "moments_per_step": len(engines[True].recorder.steps[-1]["moments"])}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        s = result["step_s"]
        print(f"step with trace {s['trace_on'] * 1e3:.1f} ms, without {s['trace_off'] * 1e3:.1f} ms "
              f"(medians of {args.steps}); overhead {result['overhead']:+.2%} (median of paired ratios); "
              f"{result['moments_per_step']} moments and {result['moves_per_step']} chunk moves recorded per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
