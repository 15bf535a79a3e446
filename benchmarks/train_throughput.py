"""Training throughput: hetmem against plain PyTorch on the same model, data and machine.

Three contenders, measured in one run, interleaved (each repeat runs all three in turn) so
that a noisy neighbour hurts them alike; figures are medians over the steady steps:

- plain: the model and torch.optim.AdamW as a user would write them (fp32; for bf16/fp16
  the usual mixed-precision recipe: fp32 parameters, autocast, AdamW);
- hetmem fits: a device budget that holds everything (the overhead of hooks and chunks);
- hetmem oversubscribed: a device budget that holds the measured activations and 1/N of the
  parameter chunks (default N=4; the model is in 16 chunks), so parameters move in every step;
  with the share of step time spent waiting on transfers.

``--overlap-cost`` adds both hetmem contenders with ``overlap_step`` off and compares each with
its overlapped self step by step (paired, in turn): the host-tier cost or gain of applying the
optimizer step during the next forward.

    python benchmarks/train_throughput.py [--json]      (also: hetmem bench throughput)
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
from hetmem.train_job import state_bytes
from hetmem.units import format_bytes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--steps", type=int, default=8, help="measured steps per contender per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--oversubscription", type=float, default=4.0,
                   help="parameter chunk bytes / device bytes left for them, in the oversubscribed run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--check-cost", action="store_true",
                   help="add 'hetmem_fits_unchecked': hetmem_fits without the per-gradient norm that the "
                        "non-finite check reads (the check's cost, same run)")
    p.add_argument("--overlap-cost", action="store_true",
                   help="add 'hetmem_fits_sync' and 'hetmem_oversubscribed_sync' (overlap_step off) and the "
                        "paired step-time ratios overlap on/off (same run)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


class Plain:
    """A model trained the way a user would without hetmem."""

    def __init__(self, model: torch.nn.Module, dtype: str):
        self.model = model
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        self.scaler = torch.amp.GradScaler("cpu") if dtype == "fp16" else None

    def step(self, x, y) -> dict:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=self.autocast, enabled=self.autocast is not None):
            loss = self.model(x, y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"seconds": time.perf_counter() - started, "wait_s": 0.0}


CHUNKS = 16  # parameter chunks both hetmem contenders use (the same layout, fits or not)


class Hetmem:
    def __init__(self, model: torch.nn.Module, dtype: str, budget: int | str, chunk_elements: int,
                 check: bool = True, overlap: bool = True):
        self.engine = hetmem.initialize(model, hetmem.Config(device="cpu", device_budget=budget, dtype=dtype,
                                                             chunk_size=chunk_elements, overlap_step=overlap,
                                                             optimizer=hetmem.AdamConfig(lr=1e-3, weight_decay=0.1)))
        self.check_s = 0.0  # seconds in the non-finite check (the norms and their sum), when timed
        if not check:  # measurement only: no squared norms, so the step sums nothing and skips nothing
            self.engine.grads.track_norm = lambda *args: None

    def time_check(self) -> None:
        """Count the seconds spent in the non-finite check's two parts (measurement only)."""
        for owner, name in ((self.engine.grads, "track_norm"), (self.engine.adam, "_sum_of_squares")):
            inner = getattr(owner, name)

            def timed(*args, inner=inner):
                started = time.perf_counter()
                try:
                    return inner(*args)
                finally:
                    self.check_s += time.perf_counter() - started

            setattr(owner, name, timed)

    def step(self, x, y) -> dict:
        started = time.perf_counter()
        loss = self.engine(x, y)
        self.engine.backward(loss)
        self.engine.step()
        seconds = time.perf_counter() - started
        record = self.engine.recorder.steps[-1] if self.engine.recorder else None
        return {"seconds": seconds, "wait_s": record["time"]["wait_s"] if record else 0.0}


def measure(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = GPTConfig(block_size=args.block_size, n_layer=args.layers, n_head=args.heads, d_model=args.d_model)
    torch.manual_seed(0)
    base = GPT(cfg)
    params = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    state = state_bytes(params, args.dtype)
    data = load_corpus()
    gen = torch.Generator().manual_seed(0)
    batches = [random_batch(data, args.batch_size, args.block_size, gen) for _ in range(args.steps + 2)]

    chunk_elements = -(-params // CHUNKS // 4096) * 4096
    contenders = {"plain": Plain(copy.deepcopy(base), args.dtype),
                  "hetmem_fits": Hetmem(copy.deepcopy(base), args.dtype, "auto", chunk_elements)}
    # the oversubscribed budget: the activations measured by a warm-up plus 1/N of the
    # parameter chunks (the chunks every forward and backward needs on the device)
    fits = contenders["hetmem_fits"].engine
    contenders["hetmem_fits"].step(*batches[0])
    activations = fits.tracer.store.peak_non_model
    param_bytes = sum(c.nbytes for c in fits.manager.chunks if c.kind is hetmem.ChunkKind.PARAM)
    budget = int(param_bytes / args.oversubscription) + activations
    contenders["hetmem_oversubscribed"] = Hetmem(copy.deepcopy(base), args.dtype, budget, chunk_elements)
    if args.check_cost:
        contenders["hetmem_fits_unchecked"] = Hetmem(copy.deepcopy(base), args.dtype, "auto", chunk_elements,
                                                     check=False)
    if args.overlap_cost:
        contenders["hetmem_fits_sync"] = Hetmem(copy.deepcopy(base), args.dtype, "auto", chunk_elements,
                                                overlap=False)
        contenders["hetmem_oversubscribed_sync"] = Hetmem(copy.deepcopy(base), args.dtype, budget, chunk_elements,
                                                          overlap=False)

    samples: dict[str, list[dict]] = {name: [] for name in contenders}
    for name, contender in contenders.items():  # warm-up step each (hetmem: the tracer's)
        if name in ("hetmem_fits_unchecked", "hetmem_fits_sync"):
            contender.step(*batches[0])  # as hetmem_fits: two steps before the measured ones
        contender.step(*batches[1])
    for _ in range(args.repeats):
        for name, contender in contenders.items():
            for x, y in batches[2:]:
                samples[name].append(contender.step(x, y))
    check = check_cost(contenders, batches[2:], args.repeats) if args.check_cost else None
    overlap = ({name: paired(contenders[name], contenders[name + "_sync"], batches[2:], args.repeats)
                for name in ("hetmem_fits", "hetmem_oversubscribed")} if args.overlap_cost else None)
    tokens = args.batch_size * args.block_size
    results = {}
    for name, runs in samples.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        results[name] = {"tokens_per_s": tokens / seconds, "step_s": seconds,
                         "wait_share": statistics.median(r["wait_s"] / r["seconds"] for r in runs),
                         "steps": len(runs)}
    over = contenders["hetmem_oversubscribed"].engine
    results["hetmem_oversubscribed"].update(
        device_budget_bytes=budget, param_chunk_bytes=param_bytes, peak_device_bytes=over.scheduler.peak_total,
        moved_bytes_per_step=sum(m["bytes"] for m in over.recorder.steps[-1]["moves"]))
    plain = results["plain"]["tokens_per_s"]
    return {
        "benchmark": "train_throughput",
        "config": {"d_model": args.d_model, "layers": args.layers, "block_size": args.block_size,
                   "batch_size": args.batch_size, "dtype": args.dtype, "steps": args.steps,
                   "repeats": args.repeats, "oversubscription": args.oversubscription,
                   "threads": torch.get_num_threads()},
        "model": {"parameters": params, "state_bytes": state, "activation_peak_bytes": activations},
        "machine": {"torch": torch.__version__, "adam_simd": _simd()},
        "results": results,
        "ratios": {name: r["tokens_per_s"] / plain for name, r in results.items()},
        **({"nonfinite_check": check} if check else {}),
        **({"overlap_on_off": overlap} if overlap else {}),
    }


def paired(on: Hetmem, off: Hetmem, batches, repeats: int) -> dict:
    """Step-time ratios on/off, one step each in turn (the order alternating)."""
    ratios = []
    for r in range(repeats):
        for i, (x, y) in enumerate(batches):
            first, second = (on, off) if (r + i) % 2 == 0 else (off, on)
            a, b = first.step(x, y)["seconds"], second.step(x, y)["seconds"]
            ratios.append(a / b if first is on else b / a)
    q = statistics.quantiles(ratios, n=4)
    return {"paired_step_ratio_median": statistics.median(ratios), "paired_step_ratio_quartiles": [q[0], q[2]],
            "pairs": len(ratios), "throughput_ratio_on_off": 1 / statistics.median(ratios)}


def check_cost(contenders: dict, batches, repeats: int) -> dict:
    """The non-finite check's cost: hetmem_fits against hetmem_fits_unchecked, one step each in
    turn (paired, so load changes hit both), and the seconds the check itself takes per step."""
    checked, unchecked = contenders["hetmem_fits"], contenders["hetmem_fits_unchecked"]
    checked.time_check()
    ratios, shares = [], []
    for _ in range(repeats):
        for x, y in batches:
            before = checked.check_s
            a = checked.step(x, y)["seconds"]
            shares.append((checked.check_s - before) / a)
            ratios.append(a / unchecked.step(x, y)["seconds"])
    q = statistics.quantiles(ratios, n=4)
    return {"paired_step_ratio_median": statistics.median(ratios), "paired_step_ratio_quartiles": [q[0], q[2]],
            "pairs": len(ratios), "check_share_of_step_median": statistics.median(shares)}


def _simd() -> str:
    from hetmem.ops import adam

    return adam.simd_level()


def table(result: dict) -> str:
    cfg, model = result["config"], result["model"]
    lines = [f"GPT d_model {cfg['d_model']} x {cfg['layers']} layers, {model['parameters']:,} parameters, "
             f"{cfg['dtype']}, batch {cfg['batch_size']}x{cfg['block_size']}, {cfg['threads']} threads; "
             f"medians of {cfg['repeats']}x{cfg['steps']} steps",
             f"{'contender':24s} {'tokens/s':>10s} {'step':>9s} {'vs plain':>9s} {'waiting':>8s}"]
    for name, r in result["results"].items():
        lines.append(f"{name:24s} {r['tokens_per_s']:10,.0f} {r['step_s'] * 1e3:7.1f}ms "
                     f"{result['ratios'][name]:9.3f} {r['wait_share']:8.1%}")
    if "nonfinite_check" in result:
        c = result["nonfinite_check"]
        lines.append(f"non-finite check (a norm per gradient, one sync per step): {c['check_share_of_step_median']:.2%} "
                     f"of hetmem_fits' step in the check itself; step with/without check "
                     f"{c['paired_step_ratio_median']:.3f} (median of {c['pairs']} paired steps, quartiles "
                     f"{c['paired_step_ratio_quartiles'][0]:.3f}-{c['paired_step_ratio_quartiles'][1]:.3f})")
    for name, c in result.get("overlap_on_off", {}).items():
        lines.append(f"{name}: overlap_step on/off step time {c['paired_step_ratio_median']:.3f} (median of "
                     f"{c['pairs']} paired steps, quartiles {c['paired_step_ratio_quartiles'][0]:.3f}-"
                     f"{c['paired_step_ratio_quartiles'][1]:.3f}); throughput on/off "
                     f"{c['throughput_ratio_on_off']:.3f}")
    over = result["results"]["hetmem_oversubscribed"]
    lines.append(f"oversubscribed: device budget {format_bytes(over['device_budget_bytes'])} = activations "
                 f"{format_bytes(model['activation_peak_bytes'])} + 1/{cfg['oversubscription']:g} of the "
                 f"{format_bytes(over['param_chunk_bytes'])} of parameter chunks (parameters + Adam state "
                 f"{format_bytes(model['state_bytes'])}); peak device {format_bytes(over['peak_device_bytes'])}, "
                 f"{format_bytes(over['moved_bytes_per_step'])} moved per step")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = measure(args)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
