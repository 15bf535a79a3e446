"""The gradient norms of one backward: hetmem's ``squared_norm`` against torch's ``vector_norm``.

The engine takes every gradient's squared norm as the gradient arrives (the non-finite check and
clipping, hetmem/grads.py), on the training thread.  This times that work for the gradients of one
backward of a GPT (by default the 151.5M-parameter one of ``nvme_train.py`` and
``nvme_vs_deepspeed.py``), each parameter's gradient once, in the training dtype:

  hetmem   ``hetmem.ops.adam.squared_norm``: for fp16/bf16 the cpu_adam op's float64 sum of
           squares, one pass, no temporary, rounded to fp32 once; for fp32 torch's own (which
           needs no copy there and runs on two threads: faster than the op's one thread)
  torch    ``torch.linalg.vector_norm(g, dtype=torch.float32).square()`` (what the engine ran
           before): on a CPU it first copies a 16-bit gradient to fp32 whole, then reduces

Alone (the default), both contenders run once per round in alternating order on the same
tensors; the figures are the medians over rounds of one backward's total, and the per-round ratio
torch / hetmem.  The largest temporary torch allocates is the fp32 copy of the largest 16-bit
gradient (none in fp32).

``--in-training DIR`` measures the same inside training, where it counts: the GPT trains with its
state on NVMe in DIR (device 64 MiB, host ``--host-budget``, batch 2 x block size, activation
checkpointing, the overlapped step) and the engine's norm function is switched between the two
contenders step by step (alternating, after one warm-up step of each), timed around every call.
There the norm shares the two cores with the IO threads, the checksum workers and the
optimizer's updates (most likely why torch's two-thread reduction is slower there than alone;
not measured apart).  Figures:
medians over steps of the norm time per backward and of the whole iteration, per contender.

    python benchmarks/grad_norm.py [--d-model 1024] [--layers 12] [--dtype bf16] [--rounds 15] [--json]
    python benchmarks/grad_norm.py --in-training DIR [--steps 8] [--host-budget 320MiB] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __name__ == "__main__" and not __package__:  # run as a file: use this checkout's hetmem
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--rounds", type=int, default=15, help="rounds (each times both contenders)")
    p.add_argument("--in-training", metavar="DIR", default=None,
                   help="time the norms inside training with the state on NVMe in DIR (see above)")
    p.add_argument("--steps", type=int, default=8, help="--in-training: measured steps per contender")
    p.add_argument("--host-budget", default="320MiB", help="--in-training: the engine's host budget")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.d_model < 1 or args.layers < 1 or args.steps < 1:
        p.error("--rounds, --steps, --d-model and --layers must be >= 1")
    return args


def gpt_config(args, checkpoint: bool = False):
    from hetmem.models.gpt import GPTConfig

    return GPTConfig(block_size=args.block_size, n_layer=args.layers, n_head=max(1, args.d_model // 64),
                     d_model=args.d_model, checkpoint=checkpoint)


def gradients(args) -> list[torch.Tensor]:
    """One random gradient per parameter of the GPT, in the training dtype (the shapes come from
    the model built on the meta device, so nothing model-sized is initialized)."""
    from hetmem.models.gpt import GPT

    with torch.device("meta"):
        shapes = [p.shape for p in GPT(gpt_config(args)).parameters()]
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen).to(DTYPES[args.dtype]) for shape in shapes]


def torch_squared_norm(g: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(g, dtype=torch.float32).square()


def contenders() -> dict:
    from hetmem.ops import adam

    return {"hetmem": adam.squared_norm, "torch": torch_squared_norm}


def run(args) -> dict:
    from hetmem.ops import adam

    grads = gradients(args)
    fns = contenders()
    for fn in fns.values():  # warm-up (and the op's build, if it is not built yet)
        for g in grads[:4]:
            fn(g)
    times = {name: [] for name in fns}
    order = list(fns)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            fn = fns[name]
            start = time.perf_counter()
            for g in grads:
                fn(g)
            times[name].append(time.perf_counter() - start)
    largest = max(grads, key=torch.Tensor.numel)
    numel = sum(g.numel() for g in grads)
    exact = sum(float(torch.sum(g.double() ** 2)) for g in grads)
    got = {name: sum(float(fn(g)) for g in grads) for name, fn in fns.items()}
    return {
        "benchmark": "grad_norm",
        "config": {"d_model": args.d_model, "layers": args.layers, "dtype": args.dtype, "rounds": args.rounds,
                   "gradients": len(grads), "elements": numel, "threads": torch.get_num_threads(),
                   "hetmem_path": adam.simd_level()},
        "median_s": {name: statistics.median(ts) for name, ts in times.items()},
        "range_s": {name: [min(ts), max(ts)] for name, ts in times.items()},
        "paired_ratio_torch_over_hetmem": statistics.median(t / h for t, h in zip(times["torch"], times["hetmem"])),
        "largest_temporary_bytes": {"hetmem": 0,
                                    "torch": 0 if largest.dtype == torch.float32 else largest.numel() * 4},
        "relative_error_vs_float64": {name: abs(value - exact) / exact for name, value in got.items()},
    }


def run_in_training(args) -> dict:
    """The norms inside training (see the module docstring): the engine's norm function switched
    between the contenders step by step, every call timed."""
    import os

    import hetmem
    import hetmem.grads
    from hetmem.corpus import load_corpus, random_batch
    from hetmem.models.gpt import GPT
    from hetmem.ops import adam

    torch.manual_seed(0)
    cfg = gpt_config(args, checkpoint=True)
    gen = torch.Generator().manual_seed(0)
    data = load_corpus()
    config = hetmem.Config(device="cpu", device_budget="64MiB", host_budget=args.host_budget, dtype=args.dtype,
                           nvme_dir=os.path.join(args.in_training, "hetmem-grad-norm"), memory_trace=False,
                           optimizer=hetmem.AdamConfig(lr=1e-4, weight_decay=0.1))
    with torch.device("meta"):
        model = GPT(cfg)
    engine = hetmem.initialize(model, config, init_fn=model.init_weights)
    fns = contenders()
    spent = [0.0]
    chosen = {"fn": fns["hetmem"]}

    def timed(g):
        start = time.perf_counter()
        out = chosen["fn"](g)
        spent[0] += time.perf_counter() - start
        return out

    original = hetmem.grads.squared_norm
    hetmem.grads.squared_norm = timed
    norm_s = {name: [] for name in fns}
    iteration_s = {name: [] for name in fns}
    try:
        order = list(fns)
        for i in range(2 * (args.steps + 1)):
            name = order[i % 2]
            chosen["fn"] = fns[name]
            x, y = random_batch(data, 2, args.block_size, gen)
            spent[0] = 0.0
            start = time.perf_counter()
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            if i >= 2:  # one warm-up step of each
                iteration_s[name].append(time.perf_counter() - start)
                norm_s[name].append(spent[0])
    finally:
        hetmem.grads.squared_norm = original
        engine.close(keep_weights=False)
    return {
        "benchmark": "grad_norm", "mode": "in_training",
        "config": {"d_model": args.d_model, "layers": args.layers, "dtype": args.dtype, "steps": args.steps,
                   "host_budget": args.host_budget, "threads": torch.get_num_threads(),
                   "hetmem_path": adam.simd_level()},
        "norm_s_per_backward": {n: statistics.median(v) for n, v in norm_s.items()},
        "iteration_s": {n: statistics.median(v) for n, v in iteration_s.items()},
        "norm_range_s": {n: [min(v), max(v)] for n, v in norm_s.items()},
        "iteration_range_s": {n: [min(v), max(v)] for n, v in iteration_s.items()},
        "norm_ratio_torch_over_hetmem": statistics.median(norm_s["torch"]) / statistics.median(norm_s["hetmem"]),
        "iteration_ratio_hetmem_over_torch": (statistics.median(iteration_s["hetmem"])
                                              / statistics.median(iteration_s["torch"])),
    }


def table_in_training(result: dict) -> str:
    cfg = result["config"]
    lines = [f"gradient norms inside training: GPT d_model {cfg['d_model']} x {cfg['layers']} layers, {cfg['dtype']}, "
             f"state on NVMe (host budget {cfg['host_budget']}); contenders alternate step by step, medians of "
             f"{cfg['steps']} steps each; hetmem op path {cfg['hetmem_path']}"]
    for name in ("hetmem", "torch"):
        low, high = result["norm_range_s"][name]
        it_low, it_high = result["iteration_range_s"][name]
        lines.append(f"  {name:7s} norms {result['norm_s_per_backward'][name] * 1e3:7.1f} ms per backward "
                     f"({low * 1e3:.0f}-{high * 1e3:.0f}); iteration {result['iteration_s'][name]:.2f} s "
                     f"({it_low:.2f}-{it_high:.2f})")
    lines.append(f"norms torch / hetmem: {result['norm_ratio_torch_over_hetmem']:.2f}x; iteration hetmem / torch: "
                 f"{result['iteration_ratio_hetmem_over_torch']:.3f}")
    return "\n".join(lines)


def table(result: dict) -> str:
    cfg = result["config"]
    lines = [f"gradient norms of one backward: GPT d_model {cfg['d_model']} x {cfg['layers']} layers, "
             f"{cfg['gradients']} gradients, {cfg['elements']:,} elements, {cfg['dtype']}; medians of "
             f"{cfg['rounds']} rounds, torch {cfg['threads']} threads, hetmem op path {cfg['hetmem_path']}"]
    for name in ("hetmem", "torch"):
        low, high = result["range_s"][name]
        temp = result["largest_temporary_bytes"][name]
        lines.append(f"  {name:7s} {result['median_s'][name] * 1e3:8.1f} ms  ({low * 1e3:.1f}-{high * 1e3:.1f})  "
                     f"largest temporary {temp / 2**20:.0f} MiB  relative error vs float64 "
                     f"{result['relative_error_vs_float64'][name]:.1e}")
    lines.append(f"torch / hetmem, paired per round: {result['paired_ratio_torch_over_hetmem']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.in_training:
        result = run_in_training(args)
        print(json.dumps(result, indent=2) if args.json else table_in_training(result))
        return 0
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
