"""hetmem against DeepSpeed ZeRO-3 (ZeRO-Infinity) with the optimizer state on NVMe, in one run.

The same model (the GPT of benchmarks/nvme_train.py: d_model 1024 x 12 layers, 151.5M
parameters, bf16, activation checkpointing), the same batches (2 x 128 from the shipped corpus)
and the same disk folder, through

- hetmem: ``nvme_dir`` set, ``device_budget`` 64 MiB + ``host_budget`` 384 MiB, the rest on NVMe;
- DeepSpeed ZeRO-3 with ``offload_optimizer`` on NVMe (``DS_ACCELERATOR=cpu``, one process, gloo,
  its JIT ops cpu_adam and async_io; ``libaio-dev`` must be installed), its aio settings made the
  same as hetmem's (block size, queue depth, threads) and ``sub_group_size`` 2e7 (its faster
  setting on this kind of machine); ``--ds-offload-param`` chooses where its parameters live.

Each framework runs in a child process of its own per round (so peak RSS is its own), the order
alternating round by round.  Reported per framework: s/step (median of the steady steps, all
rounds), disk bytes per step (``/proc/<pid>/io`` read_bytes + write_bytes over the steady steps),
peak RSS (VmHWM), and the ratios hetmem/DeepSpeed.  Without DeepSpeed importable it says so and
runs hetmem alone.  Not part of the test suite (minutes, and DeepSpeed is optional).

    pip install deepspeed==0.19.8   # check first: pip install --dry-run ... must not replace torch
    python benchmarks/nvme_vs_deepspeed.py --dir /nvme/scratch [--rounds 2 --steps 4] [--json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: import hetmem from it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hetmem.benchmarks.memlimit import run_limited  # noqa: E402

THIS = "hetmem.benchmarks.nvme_vs_deepspeed"
TARGET_TIME_RATIO = 0.8     # hetmem s/step <= 0.8x DeepSpeed's
TARGET_RSS_RATIO = 1 / 3    # at <= 1/3 of its peak RSS
GiB = 1 << 30


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=None, help="folder for both swap spaces (default: a temporary folder)")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="rounds; each runs both frameworks, order alternating")
    p.add_argument("--steps", type=int, default=4, help="steady steps per run (after one warm-up step)")
    p.add_argument("--device-budget", default="64MiB")
    p.add_argument("--host-budget", default="384MiB")
    p.add_argument("--nvme-block-size", default="1MiB", help="both frameworks' IO block size")
    p.add_argument("--nvme-queue-depth", type=int, default=16, help="both frameworks' IO queue depth")
    p.add_argument("--nvme-threads", type=int, default=1, help="hetmem nvme_threads = DeepSpeed intra_op_parallelism")
    p.add_argument("--sub-group-size", type=float, default=2e7, help="DeepSpeed's optimizer sub-group (elements)")
    p.add_argument("--ds-offload-param", choices=("none", "cpu", "nvme"), default="none",
                   help="where DeepSpeed keeps parameters (none: its 'device' memory, which is RAM on a CPU)")
    p.add_argument("--compare-release", action="store_true",
                   help="also run hetmem with nvme_release_idle=false each round ('hetmem_kept'), to measure what "
                        "handing the IO pool's idle pages back for each backward buys")
    p.add_argument("--timeout", type=float, default=900, help="seconds one child may run")
    p.add_argument("--json", action="store_true")
    return p


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


# -- the children: one framework, warm-up + steady steps --------------------------------------

def _setup(spec: dict):
    import torch

    from hetmem.corpus import load_corpus, random_batch
    from hetmem.models.gpt import GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(block_size=spec["block_size"], n_layer=spec["layers"], n_head=max(1, spec["d_model"] // 64),
                    d_model=spec["d_model"], checkpoint=True)
    gen = torch.Generator().manual_seed(0)
    data = load_corpus()
    batches = [random_batch(data, spec["batch_size"], spec["block_size"], gen) for _ in range(spec["steps"] + 1)]
    return cfg, batches


def _timed_steps(batches, step) -> dict:
    """Run ``step(x, y) -> loss`` on each batch; seconds, losses and disk bytes of the steady steps."""
    from hetmem.benchmarks.memory_accounting import disk_io

    seconds, losses, io_start = [], [], None
    for i, (x, y) in enumerate(batches):
        if i == 1:
            io_start = disk_io()
        t0 = time.perf_counter()
        losses.append(step(x, y))
        seconds.append(time.perf_counter() - t0)
    io_end = disk_io()
    steady = max(1, len(batches) - 1)
    return {"step_seconds": seconds, "losses": losses,
            "disk_read_per_step": (io_end["read_bytes"] - io_start["read_bytes"]) / steady,
            "disk_write_per_step": (io_end["write_bytes"] - io_start["write_bytes"]) / steady}


def run_hetmem(spec: dict) -> dict:
    """One hetmem engine with the state on NVMe (child side)."""
    import torch

    import hetmem
    from hetmem.benchmarks.memory_accounting import (PeakSampler, allocator_state, breakdown_now, padding_share,
                                                      preload_lazy_torch_modules, status_bytes)
    from hetmem.models.gpt import GPT

    cfg, batches = _setup(spec)
    lazy_imports = preload_lazy_torch_modules()  # torch._dynamo: the steps import it anyway (in the baseline)
    config = hetmem.Config(device="cpu", device_budget=spec["device_budget"], host_budget=spec["host_budget"],
                           nvme_dir=os.path.join(spec["dir"], "hetmem"), dtype="bf16", memory_trace=False,
                           nvme_block_size=spec["block_size_io"], nvme_queue_depth=spec["queue_depth"],
                           nvme_threads=spec["threads"], optimizer=hetmem.AdamConfig(lr=1e-4, weight_decay=0.1),
                           nvme_release_idle=spec.get("release_idle", "auto"))
    baseline_rss, baseline = status_bytes()["VmRSS"], allocator_state()
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = GPT(cfg)
    engine = hetmem.initialize(model, config, init_fn=model.init_weights)
    init_s = time.perf_counter() - t0
    io_bytes = []
    calls = [0]

    def step(x, y):
        # engine.last_step finishes an overlapped step at once (README "Overlapped optimizer
        # step"): the previous step's figures are read after backward, which finished it anyway,
        # and only the last step is finished here, so the steps run overlapped as in training
        calls[0] += 1
        loss = engine(x, y)
        engine.backward(loss)
        if engine.adam.last_result is not None and calls[0] > 1:
            io_bytes.append(engine.adam.last_result.io_bytes)
        engine.step()
        if calls[0] == len(batches):
            io_bytes.append(engine.last_step.io_bytes)
        return loss.item()

    with PeakSampler(lambda: breakdown_now(engine, baseline_rss, baseline), interval=0.01) as peak:
        out = _timed_steps(batches, step)
    out.update({"framework": "hetmem", "init_s": init_s, "parameters": engine.layout.numel,
                "rss_breakdown_at_peak": peak.at_peak, "torch_lazy_imports": lazy_imports,
                "io_pool": engine.manager.nvme.buffer_stats(),
                "optimizer_io_bytes_per_step": statistics.median(io_bytes[1:] or io_bytes),
                "chunk_padding": padding_share(engine.layout),
                "rss_breakdown_at_end": breakdown_now(engine, baseline_rss, baseline)})
    engine.close(keep_weights=False)
    return out


def run_hetmem_kept(spec: dict) -> dict:
    """hetmem with the IO pool's idle pages kept resident through backward (child side)."""
    return run_hetmem(spec | {"release_idle": False})


def deepspeed_config(spec: dict) -> dict:
    """ZeRO-3, optimizer state on NVMe, aio settings equal to hetmem's."""
    offload_param = {"none": None,
                     "cpu": {"device": "cpu", "pin_memory": False},
                     "nvme": {"device": "nvme", "nvme_path": os.path.join(spec["dir"], "deepspeed"), "pin_memory": False,
                              "buffer_count": 5, "buffer_size": int(1e8), "max_in_cpu": int(1e9)}}[spec["offload_param"]]
    zero = {"stage": 3, "sub_group_size": int(spec["sub_group_size"]), "contiguous_gradients": True,
            "overlap_comm": False, "reduce_bucket_size": int(5e7), "stage3_prefetch_bucket_size": int(5e7),
            "stage3_param_persistence_threshold": int(1e5),
            "offload_optimizer": {"device": "nvme", "nvme_path": os.path.join(spec["dir"], "deepspeed"),
                                  "pin_memory": False, "buffer_count": 4, "fast_init": False}}
    if offload_param is not None:
        zero["offload_param"] = offload_param
    return {"train_micro_batch_size_per_gpu": spec["batch_size"], "gradient_accumulation_steps": 1,
            "bf16": {"enabled": True}, "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8,
                                                      "weight_decay": 0.1}},
            "aio": {"block_size": spec["block_size_io"], "queue_depth": spec["queue_depth"],
                    "intra_op_parallelism": spec["threads"], "single_submit": False, "overlap_events": True,
                    "use_gds": False},
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_deepspeed(spec: dict) -> dict:
    """One DeepSpeed engine, ZeRO-3 with the optimizer on NVMe (child side)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())})
    import deepspeed

    from hetmem.benchmarks.memory_accounting import status_bytes
    from hetmem.models.gpt import GPT

    cfg, batches = _setup(spec)
    ds_config = deepspeed_config(spec)
    os.makedirs(os.path.join(spec["dir"], "deepspeed"), exist_ok=True)
    baseline = status_bytes()["VmRSS"]
    t0 = time.perf_counter()
    deepspeed.init_distributed(dist_backend="gloo")
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = GPT(cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    init_s = time.perf_counter() - t0
    parameters = sum(p.ds_numel for p in {id(p): p for p in model.parameters()}.values())

    def step(x, y):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        return loss.item()

    out = _timed_steps(batches, step)
    out.update({"framework": "deepspeed", "version": deepspeed.__version__, "init_s": init_s,
                "parameters": parameters, "rss_baseline": baseline, "rss_at_end": status_bytes()["VmRSS"],
                "config": ds_config})
    return out


# -- the parent: rounds, alternating --------------------------------------------------------

def child_spec(args, directory: str) -> dict:
    from hetmem.units import parse_size

    return {"dir": directory, "d_model": args.d_model, "layers": args.layers, "block_size": args.block_size,
            "batch_size": args.batch_size, "steps": args.steps, "device_budget": args.device_budget,
            "host_budget": args.host_budget, "block_size_io": parse_size(args.nvme_block_size, key="--nvme-block-size"),
            "queue_depth": args.nvme_queue_depth, "threads": args.nvme_threads, "sub_group_size": args.sub_group_size,
            "offload_param": args.ds_offload_param}


def measure(args, progress=None) -> dict:
    directory = args.dir or tempfile.mkdtemp(prefix="hetmem-vs-ds-")
    spec = child_spec(args, directory)
    frameworks = (["hetmem"] + (["hetmem_kept"] if args.compare_release else [])
                  + (["deepspeed"] if deepspeed_available() else []))
    runs: dict[str, list[dict]] = {f: [] for f in frameworks}
    for r in range(args.rounds):
        order = frameworks if r % 2 == 0 else frameworks[::-1]
        for name in order:
            result = run_limited(THIS, f"run_{name}", {"spec": spec}, limit_bytes=None, timeout_s=args.timeout)
            result["round"] = r
            runs[name].append(result)
            if progress:
                progress(_run_line(name, result))
    summary = {name: summarize(rs) for name, rs in runs.items()}
    out = {"benchmark": "nvme_vs_deepspeed", "deepspeed_available": "deepspeed" in frameworks,
           "config": {k: v for k, v in spec.items() if k != "dir"} | {"dir": directory, "rounds": args.rounds},
           "summary": summary, "runs": runs}
    if "deepspeed" in summary and summary["deepspeed"]["ok"] and summary["hetmem"]["ok"]:
        out["ratios"] = ratios(summary["hetmem"], summary["deepspeed"], runs)
    if "hetmem_kept" in summary and summary["hetmem_kept"]["ok"] and summary["hetmem"]["ok"]:
        effect = release_effect(runs)
        if effect is not None:
            out["release_idle"] = effect
    return out


def paired_by_round(runs: dict, first: str, second: str) -> list[tuple[dict, dict]]:
    """(``first``'s run, ``second``'s run) of every round where both succeeded, in ``first``'s order."""
    seconds = {r["round"]: r for r in runs[second] if r["ok"]}
    return [(r, seconds[r["round"]]) for r in runs[first] if r["ok"] and r["round"] in seconds]


def release_effect(runs: dict) -> dict | None:
    """hetmem (idle IO pages released for each backward) over hetmem_kept, paired by round; None
    when no round has both."""
    pairs = paired_by_round(runs, "hetmem", "hetmem_kept")
    if not pairs:
        return None
    time = [statistics.median(a["step_seconds"][1:]) / statistics.median(b["step_seconds"][1:]) for a, b in pairs]
    rss = [a["peak_rss_bytes"] / b["peak_rss_bytes"] for a, b in pairs]
    return {"s_per_step_per_round": time, "s_per_step_median": statistics.median(time),
            "peak_rss_per_round": rss, "peak_rss_median": statistics.median(rss),
            "peak_rss_saved_bytes_per_round": [b["peak_rss_bytes"] - a["peak_rss_bytes"] for a, b in pairs]}


def summarize(results: list[dict]) -> dict:
    ok = [r for r in results if r["ok"]]
    if not ok:
        return {"ok": False, "errors": [r.get("error") for r in results]}
    steady = [s for r in ok for s in r["step_seconds"][1:]]
    return {"ok": True, "runs": len(ok), "parameters": ok[0]["parameters"],
            "s_per_step_median": statistics.median(steady), "s_per_step_range": [min(steady), max(steady)],
            "s_per_step_per_run": [statistics.median(r["step_seconds"][1:]) for r in ok],
            "disk_bytes_per_step": statistics.median(r["disk_read_per_step"] + r["disk_write_per_step"] for r in ok),
            "disk_read_per_step": statistics.median(r["disk_read_per_step"] for r in ok),
            "disk_write_per_step": statistics.median(r["disk_write_per_step"] for r in ok),
            "peak_rss_median": statistics.median(r["peak_rss_bytes"] for r in ok),
            "peak_rss_range": [min(r["peak_rss_bytes"] for r in ok), max(r["peak_rss_bytes"] for r in ok)],
            "losses_first_run": ok[0]["losses"]}


def ratios(h: dict, d: dict, runs: dict) -> dict:
    """hetmem/DeepSpeed: of the medians, and per round (the spread)."""
    per_round = [statistics.median(a["step_seconds"][1:]) / statistics.median(b["step_seconds"][1:])
                 for a, b in paired_by_round(runs, "hetmem", "deepspeed")]
    time_ratio = h["s_per_step_median"] / d["s_per_step_median"]
    rss_ratio = h["peak_rss_median"] / d["peak_rss_median"]
    return {"s_per_step": time_ratio, "s_per_step_per_round": per_round,
            "disk_bytes_per_step": h["disk_bytes_per_step"] / d["disk_bytes_per_step"]
            if d["disk_bytes_per_step"] else None,
            "peak_rss": rss_ratio,
            "target_met": time_ratio <= TARGET_TIME_RATIO and rss_ratio <= TARGET_RSS_RATIO,
            "target": f"s/step <= {TARGET_TIME_RATIO}x and peak RSS <= 1/3 of DeepSpeed's"}


def _run_line(name: str, r: dict) -> str:
    if not r["ok"]:
        return f"round {r['round']} {name}: FAILED ({r.get('outcome')}: {r.get('error')}) {r.get('stderr_tail', '')}"
    steps = ", ".join(f"{s:.2f}" for s in r["step_seconds"])
    return (f"round {r['round']} {name}: steps {steps} s; disk {(r['disk_read_per_step'] + r['disk_write_per_step']) / 1e9:.2f}"
            f" GB/step; peak RSS {r['peak_rss_bytes'] / GiB:.2f} GiB; init {r['init_s']:.1f} s")


def table(result: dict) -> str:
    from hetmem.benchmarks.memory_accounting import format_breakdown

    c = result["config"]
    lines = [f"GPT d_model {c['d_model']} x {c['layers']} layers, bf16, batch {c['batch_size']}x{c['block_size']}, "
             f"activation checkpointing; {c['rounds']} rounds x {c['steps']} steady steps, each framework in its own "
             f"process, order alternating; aio block {c['block_size_io'] >> 10} KiB, queue depth {c['queue_depth']}, "
             f"{c['threads']} thread(s)"]
    if not result["deepspeed_available"]:
        lines.append("DeepSpeed is not importable (pip install deepspeed==0.19.8; libaio-dev): hetmem alone")
    lines.append(f"{'framework':>11s} {'params':>12s} {'s/step':>7s} {'(min-max)':>12s} {'disk GB/step':>13s} "
                 f"{'peak RSS GiB':>13s} {'(min-max)':>12s}")
    for name, s in result["summary"].items():
        if not s["ok"]:
            lines.append(f"{name:>11s} failed: {s['errors']}")
            continue
        lines.append(f"{name:>11s} {s['parameters']:12,d} {s['s_per_step_median']:7.2f} "
                     f"{s['s_per_step_range'][0]:5.2f}-{s['s_per_step_range'][1]:<6.2f} "
                     f"{s['disk_bytes_per_step'] / 1e9:13.2f} {s['peak_rss_median'] / GiB:13.2f} "
                     f"{s['peak_rss_range'][0] / GiB:5.2f}-{s['peak_rss_range'][1] / GiB:<6.2f}")
    if "ratios" in result:
        r = result["ratios"]
        per_round = ", ".join(f"{x:.2f}" for x in r["s_per_step_per_round"])
        disk = f"{r['disk_bytes_per_step']:.2f}" if r["disk_bytes_per_step"] is not None else "n/a"
        lines.append(f"hetmem/DeepSpeed: s/step {r['s_per_step']:.2f} (per round {per_round}), disk bytes {disk}, "
                     f"peak RSS {r['peak_rss']:.2f}; target ({r['target']}): {'met' if r['target_met'] else 'NOT met'}")
    if "release_idle" in result:
        e = result["release_idle"]
        saved = ", ".join(f"{b / 2**20:.0f}" for b in e["peak_rss_saved_bytes_per_round"])
        lines.append(f"idle IO pages released / kept (paired by round): s/step {e['s_per_step_median']:.3f} "
                     f"({', '.join(f'{x:.3f}' for x in e['s_per_step_per_round'])}), peak RSS "
                     f"{e['peak_rss_median']:.3f} ({saved} MiB less)")
    hetmem_runs = [r for r in result["runs"]["hetmem"] if r["ok"]]
    if hetmem_runs:
        last = hetmem_runs[-1]
        pool = last["io_pool"]
        lines.append(f"hetmem's last run: baseline includes {last['torch_lazy_imports'] / 2**20:.0f} MiB of torch modules "
                     f"imported on first use (torch._dynamo); IO pool {pool['capacity'] / 2**20:.0f} MiB "
                     f"({pool['kind']}), {pool['peak_in_use'] / 2**20:.0f} MiB at most in use, "
                     f"{pool['defragment_spills']} defragmenting spills, {pool['releases']} releases of idle pages "
                     f"({pool['refaulted'] / 2**20:.0f} MiB faulted back); chunk padding {last['chunk_padding']:.1%}")
        if last["rss_breakdown_at_peak"] is not None:
            lines.append("  at its peak: " + format_breakdown(last["rss_breakdown_at_peak"]))
        lines.append("  at its end:  " + format_breakdown(last["rss_breakdown_at_end"]))
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = None if args.json else (lambda msg: print("  " + msg, file=sys.stderr, flush=True))
    result = measure(args, progress)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
