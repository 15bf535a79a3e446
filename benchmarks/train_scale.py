"""Scale: the largest GPT that trains under a device budget, hetmem against plain PyTorch.

Both sides use the same GPT family, batch and activation checkpointing, in one run.

- plain PyTorch (parameters, gradients and AdamW state all in the chosen dtype, as
  ``torch.optim.AdamW`` keeps them): on an accelerator, the largest model that trains without
  an out-of-memory error under the budget as a per-process memory fraction; on a CPU, where
  no allocator enforces a budget, the largest whose bytes (parameters + gradients + AdamW
  state, plus activations measured by running it) fit the budget.
- hetmem: models of growing size are really trained (``--steps`` steps each) under the same
  device budget; the largest that trains within it counts.  The search stops at the first
  failure, or at ``--max-params`` (then the figure is a lower bound: the ladder ended, not
  the budget).

    python benchmarks/train_scale.py --device-budget 64MiB [--nvme-dir D] [--json]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import psutil

if __package__ in (None, ""):  # run as a script from a checkout: import hetmem from it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import hetmem
from hetmem.accelerator import default_accelerator
from hetmem.corpus import load_corpus, random_batch
from hetmem.models.gpt import GPT, GPTConfig
from hetmem.tracer.probes import CpuProbe
from hetmem.units import format_bytes, parse_count, parse_size

# (d_model, layers): a ladder of GPT shapes, roughly x1.5 parameters per rung
LADDER = [(64, 2), (96, 2), (128, 2), (128, 4), (192, 4), (256, 4), (256, 6), (320, 6), (384, 6), (384, 8),
          (512, 6), (512, 8), (640, 8), (768, 8), (768, 12), (1024, 8), (1024, 12), (1280, 12), (1536, 12),
          (1536, 16), (2048, 12), (2048, 16), (2560, 16), (3072, 16), (3072, 24)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device-budget", default="64MiB")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="steps each hetmem model must train (>= 2: warm-up + 1)")
    p.add_argument("--max-params", default="250M", help="stop the hetmem ladder here (host memory and time)")
    p.add_argument("--host-budget", default="auto")
    p.add_argument("--nvme-dir", default=None, help="turn the NVMe tier on (with a small --host-budget)")
    p.add_argument("--json", action="store_true")
    return p


def gpt(d_model: int, layers: int, block_size: int) -> GPTConfig:
    return GPTConfig(block_size=block_size, n_layer=layers, n_head=max(1, d_model // 64), d_model=d_model,
                     checkpoint=True)


def batches(args, n):
    gen = torch.Generator().manual_seed(0)
    data = load_corpus()
    return [random_batch(data, args.batch_size, args.block_size, gen) for _ in range(n)]


def plain_bytes_cpu(cfg: GPTConfig, args) -> dict:
    """Bytes plain PyTorch needs for this model on a CPU: exact state plus measured activations."""
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = GPT(cfg).to(dtype)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    probe = CpuProbe()
    x, y = batches(args, 1)[0]
    with torch.autograd.graph.saved_tensors_hooks(probe.hold_saved, probe.unwrap):
        loss = model(x, y)
    loss.backward()
    element = torch.empty((), dtype=dtype).element_size()
    state = params * element * 4  # parameters, gradients, exp_avg, exp_avg_sq
    return {"parameters": params, "bytes": state + probe.live.peak, "activations": probe.live.peak}


def plain_fits_accelerator(accelerator, cfg: GPTConfig, args, budget: int) -> tuple[bool, int]:
    """Train plain PyTorch for two steps under a device memory fraction; True unless it runs out."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = accelerator.device
    total = accelerator.free_memory()[1]
    accelerator.set_memory_fraction(budget / total)
    model = opt = None
    try:
        torch.manual_seed(0)
        model = GPT(cfg).to(device=device, dtype=dtype)
        params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for x, y in batches(args, 2):
            model(x.to(device), y.to(device)).backward()
            opt.step()
            opt.zero_grad()
        accelerator.synchronize()
        return True, params
    except accelerator.out_of_memory:
        return False, 0
    finally:
        model = opt = None  # noqa: F841
        gc.collect()
        accelerator.empty_cache()
        accelerator.set_memory_fraction(1.0)


def largest_plain(args, budget: int) -> dict:
    best = {"parameters": 0, "shape": None}
    accelerator = default_accelerator()
    for d, layers in LADDER:
        cfg = gpt(d, layers, args.block_size)
        if accelerator.separate_memory:
            fits, params = plain_fits_accelerator(accelerator, cfg, args, budget)
            info = {"parameters": params}
        else:
            info = plain_bytes_cpu(cfg, args)
            fits = info["bytes"] <= budget
        if not fits:
            break
        best = {**info, "shape": [d, layers]}
    return best


def hetmem_trains(cfg: GPTConfig, args) -> dict:
    """Train cfg under the budget for args.steps steps; the outcome and the figures."""
    config = hetmem.Config(device="auto", device_budget=args.device_budget, host_budget=args.host_budget,
                           nvme_dir=args.nvme_dir, dtype=args.dtype, memory_trace=False,
                           optimizer=hetmem.AdamConfig(lr=1e-3))
    started = time.perf_counter()
    engine = None
    try:
        with torch.device("meta"):
            model = GPT(cfg)
        engine = hetmem.initialize(model, config, init_fn=model.init_weights)
        losses = []
        for x, y in batches(args, args.steps):
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        peak = engine.scheduler.peak_total
        return {"ok": peak <= engine.budgets.device, "parameters": engine.layout.numel, "peak_device_bytes": peak,
                "losses": losses, "seconds": time.perf_counter() - started,
                "rss_bytes": psutil.Process().memory_info().rss}
    except (ValueError, RuntimeError, MemoryError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - started}
    finally:
        if engine is not None:
            engine.close(keep_weights=False)  # the weights are not needed, and may not fit in host memory
        engine = model = None  # noqa: F841
        gc.collect()


def measure(args, progress=None) -> dict:
    budget = parse_size(args.device_budget, key="--device-budget")
    max_params = parse_count(args.max_params, key="--max-params")
    plain = largest_plain(args, budget)
    tried, best = [], None
    for d, layers in LADDER:
        cfg = gpt(d, layers, args.block_size)
        if cfg.parameters > max_params:
            break
        if cfg.parameters <= plain["parameters"]:
            continue  # plain PyTorch trains it too
        outcome = hetmem_trains(cfg, args)
        outcome["shape"] = [d, layers]
        tried.append(outcome)
        if progress:
            progress(outcome)
        if not outcome["ok"]:
            break
        best = outcome
    capped = bool(tried) and tried[-1]["ok"]
    ratio = (best["parameters"] / plain["parameters"]) if best and plain["parameters"] else None
    return {"benchmark": "train_scale",
            "config": {"device_budget": budget, "dtype": args.dtype, "batch_size": args.batch_size,
                       "block_size": args.block_size, "steps": args.steps, "nvme_dir": args.nvme_dir,
                       "host_budget": args.host_budget, "device": default_accelerator().name},
            "plain": plain, "hetmem": best, "tried": tried, "ratio": ratio,
            "ratio_is_lower_bound": capped,
            "note": "the hetmem ladder ended at --max-params before any failure" if capped else ""}


def table(result: dict) -> str:
    cfg, plain, best = result["config"], result["plain"], result["hetmem"]
    lines = [f"device budget {format_bytes(cfg['device_budget'])} on {cfg['device']}, {cfg['dtype']}, "
             f"batch {cfg['batch_size']}x{cfg['block_size']}, activation checkpointing"
             + (f", NVMe at {cfg['nvme_dir']}" if cfg["nvme_dir"] else "")]
    lines.append(f"plain PyTorch largest: {plain['parameters']:,} parameters {tuple(plain['shape'] or ())}")
    lines.append(f"{'shape':>12s} {'parameters':>14s} {'trained':>8s} {'peak device':>12s} {'s':>7s}")
    for t in result["tried"]:
        lines.append(f"{str(tuple(t['shape'])):>12s} {t.get('parameters', 0):14,d} {str(t['ok']):>8s} "
                     f"{format_bytes(t.get('peak_device_bytes', 0)):>12s} {t['seconds']:7.1f}"
                     + ("" if t["ok"] else f"  {t.get('error', 'over budget')[:80]}"))
    if best:
        lines.append(f"hetmem largest: {best['parameters']:,} parameters = {result['ratio']:.1f}x plain PyTorch"
                     + (" (lower bound: the ladder ended)" if result["ratio_is_lower_bound"] else ""))
    return "\n".join(lines)


def _report_rung(outcome: dict) -> None:
    print(f"  tried {tuple(outcome['shape'])}: {'ok' if outcome['ok'] else 'failed'} ({outcome['seconds']:.1f} s)",
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = measure(args, None if args.json else _report_rung)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
