"""Scale: the largest GPT that trains under a memory limit, hetmem against plain PyTorch, in one run.

Both sides use the same GPT family, batch and activation checkpointing, and train each model of
a size ladder for ``--steps`` real steps; the largest that finishes counts (the walk up the
ladder stops at a side's first failure).

- On a CPU (where the "device" is the same RAM) the limit is real memory: each model trains in
  a child process of its own under ``--limit`` (a memory cgroup made for it, else RLIMIT_AS; the
  result says which, see benchmarks/memlimit.py).  Plain PyTorch keeps parameters, gradients and
  ``torch.optim.AdamW`` state in the chosen dtype; hetmem keeps ``--host-budget`` of chunks in
  memory and the rest on NVMe under ``--nvme-dir``.  Reported per model: the outcome, the peak
  RSS (VmHWM) and the cgroup's peak, s/step, and for hetmem its RSS broken down into its own
  state bytes and what is left (benchmarks/memory_accounting.py).
- On an accelerator the limit is the device budget, as a per-process memory fraction for plain
  PyTorch (its allocator raises out-of-memory past it) and as hetmem's ``device_budget``.

    python benchmarks/train_scale.py --limit 2GiB --nvme-dir /nvme/scratch [--json]
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: import hetmem from it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import hetmem
from hetmem.accelerator import default_accelerator
from hetmem.benchmarks.memlimit import run_limited
from hetmem.corpus import load_corpus, random_batch
from hetmem.models.gpt import GPT, GPTConfig
from hetmem.units import parse_count, parse_size

THIS = "hetmem.benchmarks.train_scale"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (d_model, layers): GPT shapes from 25M to 454M parameters (a CPU run stays within minutes)
LADDER = [(512, 8), (768, 8), (1024, 12), (1280, 12), (1536, 16)]
# the accelerator ladder, finer and longer
ACCELERATOR_LADDER = [(256, 4), (384, 8), (512, 8), (768, 8), (768, 12), (1024, 12), (1280, 12), (1536, 16),
                      (2048, 16), (2560, 16), (3072, 24)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", default="2GiB", help="CPU: RAM each child process may use (both sides)")
    p.add_argument("--device-budget", default="32MiB", help="hetmem's device budget (the limit itself on an accelerator)")
    p.add_argument("--host-budget", default="512MiB", help="hetmem's chunk bytes in host memory (CPU: inside --limit)")
    p.add_argument("--nvme-dir", default=None, help="hetmem's swap folder (CPU default: a temporary folder)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="steps each model must train")
    p.add_argument("--max-params", default="500M", help="ladder rungs above this are not tried")
    p.add_argument("--timeout", type=float, default=300, help="CPU: seconds one child may run")
    p.add_argument("--json", action="store_true")
    return p


def gpt(d_model: int, layers: int, block_size: int) -> GPTConfig:
    return GPTConfig(block_size=block_size, n_layer=layers, n_head=max(1, d_model // 64), d_model=d_model,
                     checkpoint=True)


def batches(batch_size: int, block_size: int, n: int):
    gen = torch.Generator().manual_seed(0)
    data = load_corpus()
    return [random_batch(data, batch_size, block_size, gen) for _ in range(n)]


# -- one model, one side (on a CPU: the child process's side) --------------------------------

def train_plain(shape: list[int], spec: dict, device: str = "cpu") -> dict:
    """Plain PyTorch: the model in ``dtype`` with torch.optim.AdamW, ``steps`` steps."""
    cfg = gpt(*shape, spec["block_size"])
    torch.manual_seed(0)
    model = GPT(cfg).to(device=device, dtype=DTYPES[spec["dtype"]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seconds, losses = [], []
    for x, y in batches(spec["batch_size"], spec["block_size"], spec["steps"]):
        t0 = time.perf_counter()
        loss = model(x.to(device), y.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seconds.append(time.perf_counter() - t0)
    return {"parameters": sum(p.numel() for p in model.parameters()), "step_seconds": seconds, "losses": losses}


def train_hetmem(shape: list[int], spec: dict) -> dict:
    """hetmem under ``device_budget`` + ``host_budget``, the rest on NVMe when ``nvme_dir`` is set."""
    from hetmem.benchmarks.memory_accounting import (allocator_state, breakdown_now, padding_share,
                                                      preload_lazy_torch_modules, status_bytes)

    cfg = gpt(*shape, spec["block_size"])
    config = hetmem.Config(device=spec.get("device", "auto"), device_budget=spec["device_budget"],
                           host_budget=spec["host_budget"], nvme_dir=spec["nvme_dir"], dtype=spec["dtype"],
                           memory_trace=False, optimizer=hetmem.AdamConfig(lr=1e-3))
    data = batches(spec["batch_size"], spec["block_size"], spec["steps"])
    lazy_imports = preload_lazy_torch_modules()  # the steps import them anyway: in the baseline
    baseline_rss, baseline = status_bytes()["VmRSS"], allocator_state()
    with torch.device("meta"):
        model = GPT(cfg)
    engine = hetmem.initialize(model, config, init_fn=model.init_weights)
    try:
        seconds, losses = [], []
        for x, y in data:
            t0 = time.perf_counter()
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            seconds.append(time.perf_counter() - t0)
        peak = engine.scheduler.peak_total
        out = {"parameters": engine.layout.numel, "step_seconds": seconds, "losses": losses,
               "peak_device_bytes": peak, "within_device_budget": peak <= engine.budgets.device,
               "chunk_padding": padding_share(engine.layout)}
        if not engine.accelerator.separate_memory:
            out["rss_breakdown_at_end"] = breakdown_now(engine, baseline_rss, baseline)
            out["torch_lazy_imports"] = lazy_imports
        return out
    finally:
        engine.close(keep_weights=False)  # the weights are not needed, and may not fit in host memory


# -- the ladder ------------------------------------------------------------------------------

def _spec(args, nvme_dir: str | None) -> dict:
    return {"dtype": args.dtype, "block_size": args.block_size, "batch_size": args.batch_size, "steps": args.steps,
            "device_budget": args.device_budget, "host_budget": args.host_budget, "nvme_dir": nvme_dir}


def _row(shape, params: int, result: dict) -> dict:
    row = {"shape": list(shape), "parameters": result.get("parameters", params), "ok": result["ok"],
           "outcome": result.get("outcome", "ok" if result["ok"] else "error")}
    for key in ("peak_rss_bytes", "cgroup_peak_bytes", "error", "rss_breakdown_at_end", "chunk_padding",
                "torch_lazy_imports",
                "within_device_budget", "peak_device_bytes", "losses"):
        if key in result:
            row[key] = result[key]
    if result.get("step_seconds"):
        row["s_per_step"] = statistics.median(result["step_seconds"][1:] or result["step_seconds"])
    return row


def walk_cpu(args, side: str, spec: dict, limit: int, rungs, progress) -> tuple[list[dict], dict | None]:
    """Each rung in a child under the limit, upwards until the first failure."""
    rows, limit_note = [], None
    for shape in rungs:
        params = gpt(*shape, args.block_size).parameters
        result = run_limited(THIS, f"train_{side}", {"shape": list(shape), "spec": spec}, limit_bytes=limit,
                             timeout_s=args.timeout)
        limit_note = result["limit"]
        row = _row(shape, params, result)
        rows.append(row)
        if progress:
            progress(side, row)
        if not row["ok"]:
            break
    return rows, limit_note


def walk_accelerator(args, side: str, spec: dict, rungs, progress) -> list[dict]:
    """In this process: plain PyTorch under a memory fraction of the budget, hetmem under the budget."""
    accelerator = default_accelerator()
    budget = parse_size(args.device_budget, key="--device-budget")
    rows = []
    for shape in rungs:
        params = gpt(*shape, args.block_size).parameters
        started = time.perf_counter()
        try:
            if side == "plain":
                accelerator.set_memory_fraction(budget / accelerator.free_memory()[1])
                result = train_plain(list(shape), spec, device=str(accelerator.device))
            else:
                result = train_hetmem(list(shape), {**spec, "device": "auto"})
            result["ok"] = result.get("within_device_budget", True)
        except accelerator.out_of_memory as exc:
            result = {"ok": False, "outcome": "out_of_memory", "error": str(exc)[:200]}
        except (ValueError, RuntimeError, MemoryError) as exc:
            result = {"ok": False, "outcome": "error", "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        finally:
            gc.collect()
            accelerator.empty_cache()
            accelerator.set_memory_fraction(1.0)
        result["wall_s"] = time.perf_counter() - started
        rows.append(_row(shape, params, result))
        if progress:
            progress(side, rows[-1])
        if not rows[-1]["ok"]:
            break
    return rows


def largest(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r["ok"]]
    return ok[-1] if ok else None


def measure(args, progress=None) -> dict:
    max_params = parse_count(args.max_params, key="--max-params")
    accelerator = default_accelerator()
    ladder = ACCELERATOR_LADDER if accelerator.separate_memory else LADDER
    rungs = [s for s in ladder if gpt(*s, args.block_size).parameters <= max_params]
    out = {"benchmark": "train_scale",
           "config": {"dtype": args.dtype, "batch_size": args.batch_size, "block_size": args.block_size,
                      "steps": args.steps, "device_budget": args.device_budget, "host_budget": args.host_budget,
                      "device": accelerator.name}}
    if accelerator.separate_memory:
        spec = _spec(args, args.nvme_dir)
        sides = {side: walk_accelerator(args, side, spec, rungs, progress) for side in ("plain", "hetmem")}
        out["measurement"] = f"device memory: {args.device_budget} per process (plain: memory fraction)"
    else:
        limit = parse_size(args.limit, key="--limit")
        spec = _spec(args, args.nvme_dir or tempfile.mkdtemp(prefix="hetmem-scale-"))
        sides, notes = {}, {}
        for side in ("plain", "hetmem"):
            sides[side], notes[side] = walk_cpu(args, side, spec, limit, rungs, progress)
        out["config"].update({"limit": limit, "nvme_dir": spec["nvme_dir"]})
        out["measurement"] = f"RAM: {(notes['hetmem'] or notes['plain'] or {}).get('note', args.limit)}, " \
                             f"each model in a child process of its own"
    best = {side: largest(rows) for side, rows in sides.items()}
    out.update({"plain": sides["plain"], "hetmem": sides["hetmem"],
                "largest": {side: (b["parameters"] if b else 0) for side, b in best.items()}})
    if best["plain"] and best["hetmem"]:
        out["ratio"] = best["hetmem"]["parameters"] / best["plain"]["parameters"]
        out["ratio_is_lower_bound"] = sides["hetmem"][-1]["ok"]  # hetmem never failed: the ladder ended
    return out


def _row_line(side: str, row: dict) -> str:
    rss = f"{row['peak_rss_bytes'] / 2**30:6.2f}" if "peak_rss_bytes" in row else "     -"
    step = f"{row['s_per_step']:7.2f}" if "s_per_step" in row else "      -"
    tail = "" if row["ok"] else f"  {row['outcome']}: {str(row.get('error', ''))[:70]}"
    return f"{side:>7s} {str(tuple(row['shape'])):>11s} {row['parameters']:13,d} {str(row['ok']):>6s} {rss} {step}{tail}"


def table(result: dict) -> str:
    from hetmem.benchmarks.memory_accounting import format_breakdown

    cfg = result["config"]
    lines = [f"{result['measurement']}; {cfg['device']}, {cfg['dtype']}, batch {cfg['batch_size']}x{cfg['block_size']}, "
             f"activation checkpointing, {cfg['steps']} steps per model; hetmem: device budget {cfg['device_budget']}, "
             f"host budget {cfg['host_budget']}" + (f", NVMe at {cfg['nvme_dir']}" if cfg.get("nvme_dir") else ""),
             f"{'side':>7s} {'shape':>11s} {'parameters':>13s} {'ok':>6s} {'RSS GiB':>6s} {'s/step':>7s}"]
    lines += [_row_line(side, row) for side in ("plain", "hetmem") for row in result[side]]
    lines.append(f"largest trained: plain PyTorch {result['largest']['plain']:,}, hetmem {result['largest']['hetmem']:,}"
                 + (f" parameters = {result['ratio']:.1f}x" if "ratio" in result else "")
                 + (" (a lower bound: hetmem trained every rung tried)" if result.get("ratio_is_lower_bound") else ""))
    top = largest(result["hetmem"])
    if top and "rss_breakdown_at_end" in top:
        lines.append(f"hetmem {top['parameters']:,} after its last step: " + format_breakdown(top["rss_breakdown_at_end"])
                     + f"; peak RSS {top['peak_rss_bytes'] / 2**20:.0f} MiB; the baseline holds "
                     f"{top['torch_lazy_imports'] / 2**20:.0f} MiB of torch modules a step imports on first use; "
                     f"chunk padding {top['chunk_padding']:.1%}")
    return "\n".join(lines)


def _progress(side: str, row: dict) -> None:
    print("  " + _row_line(side, row), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = measure(args, None if args.json else _progress)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
