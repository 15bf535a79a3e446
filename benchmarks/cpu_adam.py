"""CPU Adam benchmark: hetmem's kernel against torch's fused and foreach Adam, and the roofline.

On the same tensors, in one run, every contender once per round in a shuffled order, so
that a noisy machine hits all of them alike (medians over the rounds):

  fp32     hetmem adam_step; torch.optim.Adam(fused=True); torch.optim.Adam(foreach=True);
           the stream probes: Adam's exact memory traffic with trivial math, moved four ways
  mixed    bf16 gradients in, fp32 master weights and states, bf16 parameters out:
           hetmem adam_step(grad=bf16, out=bf16) in one pass, into a separate out and into
           the gradient's own memory (the engine's layout); torch as a user would do it
           (cast the bf16 gradient into an fp32 grad buffer, fused or foreach Adam, cast the
           parameters to bf16); the stream probes with the same traffic

An Adam step moves 28 bytes per parameter when fused (fp32: read param, grad, exp_avg,
exp_avg_sq, write param, exp_avg, exp_avg_sq; mixed: 16-bit grad in and 16-bit param out
instead of the fp32 grad), so GB/s is 28 B x params/s for every row.  The roofline is the
fastest probe (lowest median) of the run: adam_step's own loop, the same without software
prefetch, torch's structure (one contiguous range per thread, no software prefetch), and
streaming stores; % of roofline is its time over the row's time.  (The engine-layout row
writes the new parameter into the gradient's own cache lines rather than a fifth array, so
it can run a little above the probes' roofline.)

Every timed call starts after --gap-ms of idle time: torch's OpenMP (libgomp) threads spin
for a few ms after each parallel region, and without the gap they would take a core from
whichever contender the shuffle puts right after a torch one (measured: hetmem and the
probes ~1 ms slower right after torch fused than after a pause, torch itself not at all).

    python benchmarks/cpu_adam.py [--params 100_000_000] [--threads 2] [--repeats 15] [--gap-ms 10] [--json]
    hetmem bench adam ...
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

if __name__ == "__main__" and not __package__:  # run as a file: use this checkout's hetmem
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BYTES_PER_PARAM = 28
TARGETS = {"fp32": {"ratio": 1.0, "pct_of_roofline": 85.0}, "mixed_bf16": {"ratio": 1.3, "pct_of_roofline": 85.0}}
LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.999), 1e-8, 0.0
PROBE_PREFIX = "probe: "
# Ways to move Adam's bytes (hetmem.ops.adam.stream_probe options); the fastest is the roofline.
PROBES = {
    "adam_step's loop": {},
    "no software prefetch": {"prefetch": False},
    "torch's split, no prefetch": {"static_split": True, "prefetch": False},
    "streaming stores": {"streaming_stores": True},
}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="hetmem bench adam", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=lambda s: int(s.replace("_", "")), default=100_000_000,
                        help="parameters per step (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="threads for hetmem and torch (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=15,
                        help="timed rounds; medians reported (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each contender first")
    parser.add_argument("--gap-ms", type=float, default=10.0,
                        help="idle time before each timed call, so that no contender's spinning threads "
                             "run into the next one's time (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.params < 1 or args.threads < 1 or args.repeats < 1 or args.warmup < 0 or args.gap_ms < 0:
        parser.error("--params, --threads and --repeats must be >= 1, --warmup and --gap-ms >= 0")
    return args


class Workload:
    """The tensors every contender updates (about 26 bytes per parameter in all)."""

    def __init__(self, n: int):
        gen = torch.Generator().manual_seed(0)
        self.param = torch.randn(n, generator=gen)                      # fp32 master weights
        self.grad = torch.randn(n, generator=gen).mul_(1e-3)            # fp32 gradient
        self.grad_bf16 = self.grad.to(torch.bfloat16)                   # the mixed-precision gradient
        self.grad_cast = torch.empty(n)                                 # torch's fp32 grad buffer, mixed
        self.out_bf16 = torch.empty(n, dtype=torch.bfloat16)            # bf16 parameters out
        self.slot_bf16 = self.grad_bf16.clone()                         # grad in, param out (engine)
        self.exp_avg = torch.zeros(n)
        self.exp_avg_sq = torch.zeros(n)
        self.step = 0                                                   # hetmem's step count

    def torch_optimizer(self, *, fused: bool, grad: torch.Tensor) -> torch.optim.Optimizer:
        """torch.optim.Adam over the same param and states (its own step count)."""
        self.param.grad = grad
        opt = torch.optim.Adam([self.param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                fused=fused or None, foreach=None if fused else True)
        opt.state[self.param] = {"step": torch.tensor(0.0), "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        return opt


def contenders(w: Workload, adam) -> dict[str, dict[str, object]]:
    """section -> row name -> zero-argument callable doing one step."""
    kw = dict(lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY, decoupled=False)

    def hetmem_fp32():
        w.step += 1
        adam.adam_step(w.param, w.grad, w.exp_avg, w.exp_avg_sq, step=w.step, **kw)

    def hetmem_mixed():
        w.step += 1
        adam.adam_step(w.param, w.grad_bf16, w.exp_avg, w.exp_avg_sq, step=w.step, out=w.out_bf16, **kw)

    def hetmem_slot():  # the engine's layout: the new bf16 parameter overwrites its gradient
        w.step += 1
        adam.adam_step(w.param, w.slot_bf16, w.exp_avg, w.exp_avg_sq, step=w.step, out=w.slot_bf16, **kw)

    def torch_step(opt, grad):
        def run():
            w.param.grad = grad
            opt.step()
        return run

    def torch_mixed(opt):
        def run():
            w.grad_cast.copy_(w.grad_bf16)  # bf16 -> fp32 into a persistent buffer
            w.param.grad = w.grad_cast
            opt.step()
            w.out_bf16.copy_(w.param)       # fp32 -> bf16
        return run

    fused = w.torch_optimizer(fused=True, grad=w.grad)
    foreach = w.torch_optimizer(fused=False, grad=w.grad)
    fp32 = {"hetmem": hetmem_fp32, "torch fused": torch_step(fused, w.grad),
            "torch foreach": torch_step(foreach, w.grad)}
    mixed = {"hetmem": hetmem_mixed, "hetmem, out=grad (engine layout)": hetmem_slot,
             "torch cast+fused+cast": torch_mixed(fused),
             "torch cast+foreach+cast": torch_mixed(foreach)}
    if adam.is_available():
        for label, options in PROBES.items():
            fp32[PROBE_PREFIX + label] = functools.partial(adam.stream_probe, w.param, w.grad, w.exp_avg,
                                                           w.exp_avg_sq, **options)
            mixed[PROBE_PREFIX + label] = functools.partial(adam.stream_probe, w.param, w.grad_bf16, w.exp_avg,
                                                            w.exp_avg_sq, out=w.out_bf16, **options)
    return {"fp32": fp32, "mixed_bf16": mixed}


def measure(sections, repeats: int, warmup: int, gap_s: float, progress) -> dict[str, dict[str, list[float]]]:
    """Every contender once per round, in a new random order each round (so that neither a
    noisy moment nor the cache state another contender leaves behind favours one of them),
    each after gap_s of idle time (see the module docstring)."""
    times = {s: {name: [] for name in rows} for s, rows in sections.items()}
    calls = [(s, name, fn) for s, rows in sections.items() for name, fn in rows.items()]
    for _, _, fn in calls:
        for _ in range(warmup):
            fn()
    order = random.Random(0)
    for r in range(repeats):
        progress(f"round {r + 1}/{repeats}")
        order.shuffle(calls)
        for s, name, fn in calls:
            if gap_s:
                time.sleep(gap_s)
            start = time.perf_counter()
            fn()
            times[s][name].append(time.perf_counter() - start)
    return times


def summarize(times, n: int) -> dict[str, dict[str, dict]]:
    """Per row: median, spread, rates, % of the roofline, ratio to torch fused.  The roofline
    row is the fastest probe's (lowest median), with "probe" naming it."""
    results = {}
    for section, rows in times.items():
        reference_times = rows[next(k for k in rows if k.startswith("torch") and "fused" in k)]
        reference = statistics.median(reference_times)
        probes = [k for k in rows if k.startswith(PROBE_PREFIX)]
        best_probe = min(probes, key=lambda k: statistics.median(rows[k])) if probes else None
        roofline = statistics.median(rows[best_probe]) if best_probe else None
        results[section] = {}
        named = list(rows.items()) + ([("roofline", rows[best_probe])] if best_probe else [])
        for name, ts in named:
            median = statistics.median(ts)
            results[section][name] = {
                "median_s": median, "min_s": min(ts), "max_s": max(ts), "times_s": ts,
                "params_per_s": n / median,
                "gb_per_s": BYTES_PER_PARAM * n / median / 1e9,
                "pct_of_roofline": None if roofline is None else 100.0 * roofline / median,
                "ratio_to_torch_fused": reference / median,
                # torch fused's time over this row's in the same round, median over rounds:
                # less sensitive to a noisy machine than the ratio of the two medians
                "paired_ratio_to_torch_fused": statistics.median(r / t for r, t in zip(reference_times, ts)),
            }
        if best_probe:
            results[section]["roofline"]["probe"] = best_probe[len(PROBE_PREFIX):]
    return results


def check_targets(results) -> dict[str, dict]:
    verdicts = {}
    for section, target in TARGETS.items():
        row = results[section]["hetmem"]
        pct = row["pct_of_roofline"]
        verdicts[section] = {**{f"target_{k}": v for k, v in target.items()},
                             "ratio": row["ratio_to_torch_fused"],
                             "paired_ratio": row["paired_ratio_to_torch_fused"], "pct_of_roofline": pct,
                             "met": row["ratio_to_torch_fused"] >= target["ratio"]
                             and pct is not None and pct >= target["pct_of_roofline"]}
    return verdicts


def format_table(report) -> str:
    cfg, mach = report["config"], report["machine"]
    lines = [f"hetmem CPU Adam: {cfg['params']:,} params, {cfg['threads']} threads, medians of "
             f"{cfg['repeats']} rounds ({cfg['gap_ms']:g} ms idle before each call); {mach['cpu']}, "
             f"{mach['simd_level']} path, torch {mach['torch']}",
             f"GB/s counts {BYTES_PER_PARAM} B/param for every row (what a fused step must move)",
             f"{'':36s}{'ms':>9s}{'Mparam/s':>10s}{'GB/s':>8s}{'% roofline':>12s}{'vs torch fused':>16s}"]
    titles = {"fp32": "fp32 Adam", "mixed_bf16": "mixed: bf16 grad in, fp32 master/states, bf16 param out"}
    for section, rows in report["results"].items():
        lines.append(titles[section])
        for name, r in rows.items():
            pct = "-" if r["pct_of_roofline"] is None else f"{r['pct_of_roofline']:.1f} %"
            if name == "roofline":
                name = "roofline = fastest probe"
            lines.append(f"  {name:34s}{r['median_s'] * 1e3:9.1f}{r['params_per_s'] / 1e6:10.0f}"
                         f"{r['gb_per_s']:8.1f}{pct:>12s}{r['ratio_to_torch_fused']:15.2f}x")
    for section, rows in report["results"].items():
        if "roofline" in rows:
            lines.append(f"roofline {section}: {PROBE_PREFIX}{rows['roofline']['probe']} (the fastest of "
                         f"{len(PROBES)} ways to move Adam's bytes with trivial math, timed in this run)")
    for section, v in report["targets"].items():
        pct = "n/a" if v["pct_of_roofline"] is None else f"{v['pct_of_roofline']:.0f}%"
        lines.append(f"target {section}: >= {v['target_ratio']}x torch and >= {v['target_pct_of_roofline']:.0f}% "
                     f"of roofline: {'met' if v['met'] else 'MISSED'} ({v['ratio']:.2f}x, {pct}; paired "
                     f"per-round ratio {v['paired_ratio']:.2f}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hetmem.env import cpu_model
    from hetmem.ops import adam

    def progress(msg: str) -> None:
        print(f"[cpu_adam bench] {msg}", file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)
    adam.set_num_threads(args.threads)
    progress(f"allocating {args.params:,} params (~{args.params * 26 / 2**30:.1f} GiB) and building the op")
    workload = Workload(args.params)
    sections = contenders(workload, adam)
    times = measure(sections, args.repeats, args.warmup, args.gap_ms / 1e3, progress)
    results = summarize(times, args.params)
    report = {
        "benchmark": "cpu_adam",
        "config": {"params": args.params, "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
                   "gap_ms": args.gap_ms, "probes": PROBES,
                   "bytes_per_param": BYTES_PER_PARAM, "optimizer": "Adam", "lr": LR, "betas": list(BETAS),
                   "eps": EPS, "weight_decay": WEIGHT_DECAY},
        "machine": {"cpu": cpu_model(), "simd_level": adam.simd_level(), "hetmem_threads": adam.get_num_threads(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "results": results,
        "targets": check_targets(results),
    }
    if not adam.is_available():
        report["note"] = f"hetmem ran its pure-PyTorch fallback: {adam.unavailable_reason()}"
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
