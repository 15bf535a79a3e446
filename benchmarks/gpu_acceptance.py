"""GPU acceptance: one command that shows hetmem's GPU paths work, and what they cost.

    python benchmarks/gpu_acceptance.py [--model 350m|1.3b] [--json]      (also: hetmem bench gpu)

On a machine with a GPU, in at most ``--max-minutes`` (8):

1. the ``gpu``-marked tests (pytest in a subprocess);
2. the budget promise: a GPT trained by hetmem under ``device_budget`` on a GPU capped at that
   budget (a per-process memory fraction); the allocator's peak after the warm-up must not pass it;
3. throughput: tokens/s of that GPT (bf16; 350M or 1.3B parameters) under a budget far below its
   state, the step split into compute, transfer wait and CPU Adam, against plain PyTorch on the
   same model and batches (fp32 weights, bf16 autocast, AdamW) where it fits;
4. if DeepSpeed is importable: the same model under ZeRO-3 with parameters and optimizer state
   offloaded to the CPU, side by side.

Prints one JSON object.  Without an accelerator it prints one line saying so and
``{"skipped": "no CUDA"}``, and exits 0.  CI runs the orchestration on the simulated device
(``HETMEM_DEVICE=sim``) with ``--model tiny`` (tests/test_gpu_acceptance.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: import hetmem from it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import hetmem
from hetmem.accelerator import default_accelerator
from hetmem.corpus import load_corpus, random_batch
from hetmem.models.gpt import GPT, GPTConfig
from hetmem.train_job import state_bytes
from hetmem.units import parse_size

ROOT = Path(__file__).resolve().parent.parent
GPU_TESTS = ["tests/engine/test_gpu.py", "tests/nvme/test_buffers.py"]
# model, device budget (far below the state: 14 B per parameter), batch, context
PRESETS = {
    "350m": dict(cfg=dict(n_layer=28, n_head=16, d_model=1024, block_size=1024), budget="2GiB", batch=8),
    "1.3b": dict(cfg=dict(n_layer=24, n_head=32, d_model=2048, block_size=1024), budget="6GiB", batch=4),
    "tiny": dict(cfg=dict(n_layer=3, n_head=4, d_model=64, block_size=32), budget="2304KiB", batch=4),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(PRESETS), default="350m")
    p.add_argument("--budget", default=None, help="device budget (default: the preset's)")
    p.add_argument("--steps", type=int, default=6, help="measured steps per contender (after 2 warm-up steps)")
    p.add_argument("--max-minutes", type=float, default=8.0)
    p.add_argument("--no-tests", action="store_true", help="skip the gpu-marked tests")
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument("--json", action="store_true", help="only the JSON object (it is printed either way)")
    return p


def gpu_tests(seconds: float) -> dict:
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TESTS]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10.0, seconds))
    except subprocess.TimeoutExpired:
        return {"passed": False, "summary": f"timed out after {seconds:.0f} s", "seconds": seconds}
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"passed": done.returncode == 0, "summary": lines[-1] if lines else done.stderr[-500:],
            "seconds": round(time.perf_counter() - started, 1)}


def batches(cfg: GPTConfig, batch: int, n: int):
    data = load_corpus()
    gen = torch.Generator().manual_seed(0)
    return [random_batch(data, batch, cfg.block_size, gen) for _ in range(n)]


def _median(values):
    return statistics.median(values) if values else None


def run_hetmem(accelerator, cfg: GPTConfig, budget: int, data) -> dict:
    """hetmem under ``budget`` on a device capped at it; per step: compute, transfer wait, CPU Adam."""
    total = accelerator.free_memory()[1]
    accelerator.set_memory_fraction(min(1.0, budget / total))
    try:
        torch.manual_seed(0)
        with torch.device("meta"):
            model = GPT(cfg)
        engine = hetmem.initialize(model, hetmem.Config(device="auto", device_budget=budget, dtype="bf16",
                                                        memory_trace=False), init_fn=model.init_weights)
        device = engine.accelerator  # the same device (on the simulated one: the engine's own)
        steps, losses = [], []
        for i, (x, y) in enumerate(data):
            if i == 2:  # after the warm-up: the budget check covers every later step
                device.synchronize()
                device.reset_peak_memory_stats()
            waited = engine.scheduler.wait_s
            started = time.perf_counter()
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())  # a host sync: the step's work is done
            seconds = time.perf_counter() - started
            result = engine.last_step
            transfer = (engine.scheduler.wait_s - waited) + result.io_wait_s
            adam = result.compute_s
            steps.append({"seconds": seconds, "transfer_wait_s": transfer, "cpu_adam_s": adam,
                          "compute_s": max(0.0, seconds - transfer - adam)})
        device.synchronize()
        peak = device.max_memory_allocated()
        measured = steps[2:]
        tokens = data[0][0].numel()
        engine.close()
        return {"ok": True, "budget_bytes": budget, "allocator_peak_bytes": peak, "budget_held": peak <= budget,
                "tokens_per_s": tokens / _median([s["seconds"] for s in measured]),
                "step_s": {k: _median([s[k] for s in measured])
                           for k in ("seconds", "compute_s", "transfer_wait_s", "cpu_adam_s")},
                "losses": losses}
    except accelerator.out_of_memory as exc:
        return {"ok": False, "budget_held": False, "error": f"out of memory under the budget: {exc}"[:500]}
    finally:
        accelerator.empty_cache()
        accelerator.set_memory_fraction(1.0)


def run_plain(accelerator, cfg: GPTConfig, data) -> dict:
    """Plain PyTorch on the same model: fp32 weights, bf16 autocast, AdamW."""
    device = accelerator.device
    try:
        torch.manual_seed(0)
        model = GPT(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for x, y in data:
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(x.to(device), y.to(device))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            times.append(time.perf_counter() - started)
        return {"fits": True, "tokens_per_s": data[0][0].numel() / _median(times[2:])}
    except accelerator.out_of_memory:
        return {"fits": False}
    finally:
        model = opt = None  # noqa: F841
        accelerator.empty_cache()


def run_deepspeed(accelerator, cfg: GPTConfig, batch: int, data) -> dict:
    """The same model under DeepSpeed ZeRO-3, parameters and optimizer state offloaded to the CPU."""
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints (op builds); stdout is this benchmark's JSON
        return _run_deepspeed(accelerator, cfg, batch, data)


def _run_deepspeed(accelerator, cfg: GPTConfig, batch: int, data) -> dict:
    try:
        import deepspeed
    except ImportError as exc:
        return {"skipped": f"deepspeed not importable ({exc})"}
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}},
              "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
                                    "offload_optimizer": {"device": "cpu", "pin_memory": True}}}
    try:
        deepspeed.init_distributed()
        torch.manual_seed(0)
        model = GPT(cfg)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        times = []
        for x, y in data:
            started = time.perf_counter()
            loss = engine(x.to(engine.device), y.to(engine.device))
            engine.backward(loss)
            engine.step()
            loss.item()
            times.append(time.perf_counter() - started)
        return {"ok": True, "tokens_per_s": data[0][0].numel() / _median(times[2:])}
    except Exception as exc:  # noqa: BLE001 - reported in the JSON, the other results stand
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}


def measure(args: argparse.Namespace, accelerator) -> dict:
    started = time.perf_counter()
    preset = PRESETS[args.model]
    cfg = GPTConfig(checkpoint=True, **preset["cfg"])
    params = cfg.parameters
    budget = parse_size(args.budget or preset["budget"], key="--budget")
    data = batches(cfg, preset["batch"], args.steps + 2)
    result = {"benchmark": "gpu_acceptance", "accelerator": accelerator.describe(),
              "model": {"preset": args.model, "parameters": params, "state_bytes": state_bytes(params, "bf16"),
                        "batch": preset["batch"], "context": cfg.block_size, "dtype": "bf16",
                        "activation_checkpointing": True},
              "budget_bytes": budget}
    deadline = started + args.max_minutes * 60
    if not args.no_tests:
        result["gpu_tests"] = gpu_tests(min(240.0, (deadline - time.perf_counter()) / 2))
    result["hetmem"] = run_hetmem(accelerator, cfg, budget, data)
    result["plain"] = run_plain(accelerator, cfg, data)
    result["deepspeed"] = ({"skipped": "--no-deepspeed"} if args.no_deepspeed
                           else run_deepspeed(accelerator, cfg, preset["batch"], data))
    h, p = result["hetmem"], result["plain"]
    if h.get("ok") and p.get("fits"):
        result["hetmem_vs_plain_tokens_per_s"] = h["tokens_per_s"] / p["tokens_per_s"]
    result["passed"] = bool(h.get("budget_held")) and result.get("gpu_tests", {"passed": True})["passed"]
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    accelerator = default_accelerator()
    if not accelerator.separate_memory:
        print("gpu_acceptance: no CUDA (no accelerator) on this machine; nothing to accept", file=sys.stderr)
        print(json.dumps({"skipped": "no CUDA"}))
        return 0
    result = measure(args, accelerator)
    print(json.dumps(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
