"""Memory overhead: hetmem's RSS against its own state bytes, stage by stage, and what is left.

One GPT trains a few steps in a child process of its own (so RSS and its peak are the run's),
once with every chunk in memory and once with the state on NVMe.  After initialize, after the
warm-up step, after the last step and at the peak of the steps (a thread reading VmRSS), RSS is
split (benchmarks/memory_accounting.py) into the baseline (interpreter, torch with the modules a
step imports on first use, the data: measured before the engine exists), hetmem's chunks per
kind, the free buffers its pool keeps, the IO pool's resident pages that hold no block, the
step's temporaries (glibc's bytes in use beyond the baseline and the engine's), glibc's resident
free heap, file pages mapped since the baseline (the C++ ops' libraries), and what is left.

    python benchmarks/memory_overhead.py [--d-model 768 --layers 8] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: import hetmem from it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hetmem.benchmarks.memlimit import run_limited  # noqa: E402

THIS = "hetmem.benchmarks.memory_overhead"
MiB = 1 << 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device-budget", default="32MiB")
    p.add_argument("--nvme-host-budget", default="256MiB", help="host_budget of the NVMe run")
    p.add_argument("--steps", type=int, default=3, help="steps, the warm-up included")
    p.add_argument("--dir", default=None, help="swap folder of the NVMe run (default: a temporary folder)")
    p.add_argument("--json", action="store_true")
    return p


def run(spec: dict) -> dict:
    """Child side: one engine, the breakdown after initialize, the warm-up step and the last step."""
    import torch

    import hetmem
    from hetmem.benchmarks.memory_accounting import (PeakSampler, allocator_state, breakdown_now, malloc_stats,
                                                     padding_share, preload_lazy_torch_modules, status_bytes)
    from hetmem.corpus import load_corpus, random_batch
    from hetmem.models.gpt import GPT, GPTConfig
    from hetmem.train_job import state_bytes

    cfg = GPTConfig(block_size=spec["block_size"], n_layer=spec["layers"], n_head=max(1, spec["d_model"] // 64),
                    d_model=spec["d_model"], checkpoint=True)
    gen = torch.Generator().manual_seed(0)
    data = load_corpus()
    batches = [random_batch(data, spec["batch_size"], spec["block_size"], gen) for _ in range(spec["steps"])]
    config = hetmem.Config(device="cpu", device_budget=spec["device_budget"], host_budget=spec["host_budget"],
                           nvme_dir=spec["nvme_dir"], dtype=spec["dtype"], memory_trace=False,
                           optimizer=hetmem.AdamConfig(lr=1e-3))
    lazy_imports = preload_lazy_torch_modules()  # the steps import them anyway: in the baseline
    baseline_rss, baseline = status_bytes()["VmRSS"], allocator_state()
    with torch.device("meta"):
        model = GPT(cfg)
    engine = hetmem.initialize(model, config, init_fn=model.init_weights)

    def snapshot(stage: str) -> dict:
        heap = malloc_stats() or {}
        return {"stage": stage, "peak_rss_so_far": status_bytes()["VmHWM"], "glibc_free_heap": heap.get("heap_free"),
                **breakdown_now(engine, baseline_rss, baseline)}

    stages = [snapshot("after initialize")]
    with PeakSampler(lambda: snapshot("at the peak of the steps"), interval=0.01) as peak:
        for i, (x, y) in enumerate(batches):
            engine.backward(engine(x, y))
            engine.step()
            if i == 0 or i == len(batches) - 1:
                stages.append(snapshot("after the warm-up step" if i == 0 else f"after step {i + 1}"))
    if peak.at_peak is not None:
        stages.append(peak.at_peak)
    out = {"parameters": engine.layout.numel, "state_bytes": state_bytes(engine.layout.numel, spec["dtype"]),
           "chunk_padding": padding_share(engine.layout), "torch_lazy_imports": lazy_imports, "stages": stages}
    engine.close(keep_weights=False)
    return out


def measure(args) -> dict:
    base = {"d_model": args.d_model, "layers": args.layers, "dtype": args.dtype, "block_size": args.block_size,
            "batch_size": args.batch_size, "device_budget": args.device_budget, "steps": args.steps}
    runs = {"memory": {**base, "host_budget": "auto", "nvme_dir": None},
            "nvme": {**base, "host_budget": args.nvme_host_budget,
                     "nvme_dir": args.dir or tempfile.mkdtemp(prefix="hetmem-overhead-")}}
    return {"benchmark": "memory_overhead", "config": base,
            "runs": {name: {"spec": spec, **run_limited(THIS, "run", {"spec": spec}, limit_bytes=None, timeout_s=900)}
                     for name, spec in runs.items()}}


def table(result: dict) -> str:
    from hetmem.benchmarks.memory_accounting import format_breakdown

    c = result["config"]
    lines = [f"GPT d_model {c['d_model']} x {c['layers']} layers, {c['dtype']}, batch {c['batch_size']}x{c['block_size']}, "
             f"device budget {c['device_budget']}, {c['steps']} steps"]
    for name, r in result["runs"].items():
        if not r["ok"]:
            lines.append(f"{name}: FAILED {r.get('error')} {r.get('stderr_tail', '')}")
            continue
        where = "every chunk in memory" if name == "memory" else \
            f"state on NVMe, host_budget {r['spec']['host_budget']}"
        lines.append(f"{where}: {r['parameters']:,} parameters, state {r['state_bytes'] / MiB:.0f} MiB "
                     f"(parameters + master + Adam moments), chunk padding {r['chunk_padding']:.1%}, peak RSS "
                     f"{r['peak_rss_bytes'] / MiB:.0f} MiB; the baseline holds {r['torch_lazy_imports'] / MiB:.0f} "
                     f"MiB of torch modules a step imports on first use (torch._dynamo)")
        for s in r["stages"]:
            lines.append(f"  {s['stage']:>24s}: {format_breakdown(s)}; peak so far {s['peak_rss_so_far'] / MiB:.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = measure(args)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
