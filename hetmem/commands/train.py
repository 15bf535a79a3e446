"""`hetmem train`: train a byte-level GPT far larger than the device budget on the shipped
corpus, with a progress bar, then write and print the memory report."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from hetmem.units import format_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hetmem.train_job import TrainOptions

    d = TrainOptions()
    parser.add_argument("--d-model", type=int, default=d.d_model, help="model width (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=d.n_layer, help="transformer blocks (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=d.n_head, help="attention heads (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=d.block_size, help="context bytes (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=d.dtype, help="default: %(default)s")
    parser.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--device-budget", default=d.device_budget,
                        help="bytes hetmem may keep on the device, e.g. 12MiB (default: %(default)s)")
    parser.add_argument("--host-budget", default=d.host_budget, help="chunk bytes in host memory (default: %(default)s)")
    parser.add_argument("--nvme-dir", default=None, help="a folder for the NVMe tier (default: off)")
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="default: %(default)s")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep activations instead of recomputing")
    parser.add_argument("--corpus", default=None, help="train on this text file instead of the shipped corpus")
    parser.add_argument("--out", default=None, help="folder for the run's report (default: hetmem_runs/<time>)")
    parser.add_argument("--sample", type=int, default=200, help="bytes of text to generate at the end (0: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs a line per 10%% instead)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from hetmem.train_job import TrainOptions, build, default_run_dir, sample, state_bytes, train

    options = TrainOptions(d_model=args.d_model, n_layer=args.layers, n_head=args.heads, block_size=args.block_size,
                           batch_size=args.batch_size, steps=args.steps, dtype=args.dtype, device=args.device,
                           device_budget=args.device_budget, host_budget=args.host_budget, nvme_dir=args.nvme_dir,
                           lr=args.lr, seed=args.seed, checkpointing=not args.no_checkpointing, corpus=args.corpus)
    try:
        engine, cfg = build(options)
    except ValueError as exc:
        print(f"hetmem train: error: {exc}", file=sys.stderr)
        return 2
    params = engine.layout.numel
    state = state_bytes(params, options.dtype)
    budget = engine.budgets.device
    print(f"model: GPT, {cfg.n_layer} layers x d_model {cfg.d_model}, {params:,} parameters; "
          f"parameters + Adam state {format_bytes(state)} = {state / budget:.1f}x the device budget "
          f"({format_bytes(budget)} on {engine.device})")
    print(f"chunks: {len(engine.layout.groups)} groups of {engine.layout.chunk_elements:,} elements, {options.dtype}")
    out = Path(args.out) if args.out else default_run_dir()
    last = None
    with tqdm(total=options.steps, unit="step", disable=args.no_progress, dynamic_ncols=True) as bar:
        for metrics in train(engine, options):
            last = metrics
            bar.update(1)
            bar.set_postfix(loss=f"{metrics.loss:.3f}", tok_s=f"{metrics.tokens_per_s:,.0f}",
                            peak=format_bytes(metrics.peak_device_bytes))
            if args.no_progress and (metrics.step % max(1, options.steps // 10) == 0):
                print(f"step {metrics.step}/{options.steps} loss {metrics.loss:.3f} "
                      f"{metrics.tokens_per_s:,.0f} tok/s peak device {format_bytes(metrics.peak_device_bytes)}")
    report = engine.memory_report()
    report.save(out)
    paths = report.render_all(out)
    (out / "options.json").write_text(json.dumps({f.name: getattr(options, f.name) for f in fields(options)},
                                                 indent=2, default=str))
    print()
    print(report.to_text())
    print()
    if last is not None:
        print(f"final loss {last.loss:.3f} after {last.step} steps; peak device bytes "
              f"{format_bytes(engine.scheduler.peak_total)} of {format_bytes(budget)} "
              f"({engine.scheduler.peak_total <= budget and 'within' or 'OVER'} budget)")
    if args.sample > 0:
        print("sample:", repr(sample(engine, "We the People", args.sample, cfg.block_size, seed=options.seed)))
    print(f"report: {out}/ ({', '.join(p.name for p in paths.values())})")
    engine.close()
    return 0
