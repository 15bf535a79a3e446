"""`hetmem train`: train a byte-level GPT far larger than the device budget on the shipped
corpus, with a progress bar, then write and print the memory report (with the loss curve).
Checkpoints with --save-every; --resume continues a run bit-exactly."""
from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

from hetmem.units import format_bytes

LATEST = ""  # --resume without a folder: the newest run with a checkpoint
INTERRUPTED = 130  # the exit code of a run stopped with Ctrl-C, as a shell reports SIGINT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hetmem.train_job import LR_SCHEDULES, TrainOptions

    d = TrainOptions()
    parser.add_argument("--d-model", type=int, default=d.d_model, help="model width (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=d.n_layer, help="transformer blocks (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=d.n_head, help="attention heads (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=d.block_size, help="context bytes (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps (default: {d.steps}; with --resume: the run's, or more to extend it)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=d.dtype, help="default: %(default)s")
    parser.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--device-budget", default=d.device_budget,
                        help="bytes hetmem may keep on the device, e.g. 12MiB (default: %(default)s)")
    parser.add_argument("--host-budget", default=d.host_budget, help="chunk bytes in host memory (default: %(default)s)")
    parser.add_argument("--nvme-dir", default=None, help="a folder for the NVMe tier (default: off)")
    parser.add_argument("--chunk-size", default=None, metavar="SIZE",
                        help="parameters per chunk (e.g. 4194304), bytes of them (e.g. 64MiB), or auto: sized from "
                             "the device budget, and with --nvme-dir from the host budget and the disk (default: "
                             "auto; with --resume: the run's)")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                        help="after the warm-up: cosine decay to 10%% of --lr, or constant (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                        help="steps of linear learning-rate warm-up (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="default: %(default)s")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep activations instead of recomputing")
    parser.add_argument("--corpus", default=None, help="train on this text file instead of the shipped corpus")
    parser.add_argument("--out", default=None, help="folder for the run (default: hetmem_runs/<time>)")
    parser.add_argument("--save-every", type=int, default=None, metavar="N",
                        help="checkpoint every N steps and at the end, under RUN_DIR/checkpoints (default: off; "
                             "with --resume: the run's)")
    parser.add_argument("--resume", nargs="?", const=LATEST, default=None, metavar="RUN_DIR",
                        help="continue a run from its latest checkpoint (default: the newest run in hetmem_runs/), "
                             "with the run's own options")
    parser.add_argument("--sample", type=int, default=200, help="bytes of text to generate at the end (0: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (prints a line per 10%% instead)")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="data parallel: run N ranks on this machine (torch.distributed.run; gloo on the CPU, "
                             "NCCL on GPUs), each on 1/N of every batch (default: %(default)s)")
    parser.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="with --nproc: how long a rank waits for the others before failing (default: %(default)s)")


def _options(args: argparse.Namespace):
    """(options, run folder): the command line's, or with --resume the run's own."""
    from hetmem.train_job import TrainOptions, default_run_dir, latest_run_dir, read_options

    if args.resume is not None:
        out = latest_run_dir() if args.resume == LATEST else Path(args.resume)
        options = read_options(out)
        changes = {"steps": args.steps, "save_every": args.save_every}
        changes = {k: v for k, v in changes.items() if v is not None}
        if args.chunk_size is not None:  # checkpoints load into any chunk size
            changes["extra"] = {**options.extra, "chunk_size": chunk_size_option(args.chunk_size)}
        return TrainOptions.from_dict({**options.to_dict(), **changes}), out
    options = TrainOptions(d_model=args.d_model, n_layer=args.layers, n_head=args.heads, block_size=args.block_size,
                           batch_size=args.batch_size, steps=args.steps or TrainOptions().steps, dtype=args.dtype,
                           device=args.device, device_budget=args.device_budget, host_budget=args.host_budget,
                           nvme_dir=args.nvme_dir, lr=args.lr, lr_schedule=args.lr_schedule,
                           warmup_steps=args.warmup_steps, save_every=args.save_every or 0, seed=args.seed,
                           checkpointing=not args.no_checkpointing, corpus=args.corpus,
                           extra={} if args.chunk_size is None else {"chunk_size": chunk_size_option(args.chunk_size)})
    return options, Path(args.out) if args.out else default_run_dir()


def chunk_size_option(text: str) -> int | str:
    """--chunk-size as a config value (elements, a size string, or "auto"), checked like the config's
    ``chunk_size``; ValueError naming the flag, the value and the fix."""
    from hetmem.config import Config

    text = text.strip()
    value: int | str = int(text) if text.isdigit() else text
    try:
        if re.fullmatch(r"[-+]?[\d.]+(e[-+]?\d+)?", text, re.IGNORECASE) and not text.isdigit():
            raise ValueError("a bare number counts parameters: a whole number > 0")
        Config(chunk_size=value)
    except ValueError:
        raise ValueError(f"--chunk-size {text!r} is not a chunk size: give parameters per chunk (an int > 0, e.g. "
                         f"4194304), bytes of them (e.g. 64MiB) or auto") from None
    return value


def _build_ops(options) -> None:
    """Compile the C++ ops before the first step, so that step (and the bar's ETA) is honest."""
    from hetmem.train_job import load_ops, ops_needed

    pending = [op.name for op in ops_needed(options) if op.needs_build()]
    if not pending:
        return
    print(f"building C++ ops ({', '.join(pending)}; once, ~20 s)...", flush=True)
    started = time.perf_counter()
    missing = load_ops(options)
    if missing:
        print(f"could not build {', '.join(missing)}: training with the slower pure-PyTorch fallback "
              f"(`hetmem env --build` says why)", flush=True)
    else:
        print(f"built in {time.perf_counter() - started:.1f} s (cached for later runs)", flush=True)


def run(args: argparse.Namespace) -> int:
    from hetmem.distributed.launch import init_from_env, launch_ranks, world_size_from_env
    from hetmem.train_job import (CHECKPOINTS, build, make_scheduler, new_state, resume_state, state_bytes,
                                  write_options)

    _check_data_parallel_options(args)
    options, out = _options(args)
    if args.nproc > 1 and world_size_from_env() == 1:  # start the ranks; each runs this command again
        if options.batch_size % args.nproc:  # said once here, not by every rank after the launch
            raise ValueError(f"--batch-size {options.batch_size} must be a multiple of --nproc {args.nproc}: each "
                             f"rank trains on an equal slice of every batch")
        _build_ops(options)                              # once, before the ranks race to build it
        return launch_ranks(_rank_argv(args, out), args.nproc)
    leader = not init_from_env(options.device, args.dist_timeout) or _rank() == 0
    if not leader:
        args.no_progress, args.sample = True, 0
    _build_ops(options)
    engine, cfg = build(options)
    try:
        scheduler = make_scheduler(engine, options)
        if args.resume is not None:
            state = resume_state(engine, scheduler, out)
            if leader:
                print(f"resuming {out} at step {state.step} of {options.steps}")
        else:
            state = new_state(options)
        if leader:
            write_options(out, options)
        if not leader:  # the other ranks train in silence; rank 0 speaks for all
            _train_quietly(engine, options, scheduler, state, out / CHECKPOINTS)
            _finish_rank(engine, out)
            return 0
        params = engine.layout.numel
        size = state_bytes(params, options.dtype)
        budget = engine.budgets.device
        print(f"model: GPT, {cfg.n_layer} layers x d_model {cfg.d_model}, {params:,} parameters; "
              f"parameters + Adam state {format_bytes(size)} = {size / budget:.1f}x the device budget "
              f"({format_bytes(budget)} on {engine.device})")
        print(f"chunks: {len(engine.layout.groups)} groups of up to {engine.layout.chunk_elements:,} parameters "
              f"(each trimmed to the parameters it holds), {options.dtype}"
              + ("" if engine.nvme_plan is None else f"; NVMe step pipeline: {engine.nvme_plan.depth} read ahead"))
        try:
            _train_with_progress(engine, options, scheduler, state, out / CHECKPOINTS, args)
        except KeyboardInterrupt:
            print(f"\ninterrupted after step {state.step}; {_how_to_resume(out)}", file=sys.stderr)
            return INTERRUPTED
        _finish(engine, options, state, cfg, out, args)
    finally:
        engine.close()
    return 0


def _check_data_parallel_options(args: argparse.Namespace) -> None:
    """ValueError naming the flag unless --nproc is >= 1 and --dist-timeout a positive number of seconds."""
    if args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: give the number of ranks to run, 1 or more (1: one process)")
    if not math.isfinite(args.dist_timeout) or args.dist_timeout <= 0:
        raise ValueError(f"--dist-timeout {args.dist_timeout:g}: give the seconds a rank waits for the others, "
                         f"a number > 0 (default 300)")


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _rank_argv(args: argparse.Namespace, out: Path) -> list[str]:
    """This command line for the ranks: without --nproc, with the run folder fixed (ranks
    started a second apart would choose different default folders)."""
    given = getattr(args, "argv", None) or sys.argv[1:]  # hetmem.cli.main's command line
    argv, skip = [], False
    for i, item in enumerate(given):
        if skip:
            skip = False
            continue
        if item in ("--nproc", "--out", "--resume"):
            # --resume's value is optional: the next item is its value unless it is an option
            skip = item != "--resume" or (i + 1 < len(given) and not given[i + 1].startswith("-"))
            continue
        if item.startswith(("--nproc=", "--out=", "--resume=")):
            continue
        argv.append(item)
    where = ["--resume", str(out)] if args.resume is not None else ["--out", str(out)]
    return argv + where


def _train_quietly(engine, options, scheduler, state, checkpoint_dir: Path) -> None:
    from hetmem.train_job import train

    for _ in train(engine, options, scheduler, state, checkpoint_dir=checkpoint_dir):
        pass


def _finish_rank(engine, out: Path) -> None:
    """Each rank's memory report in RUN_DIR/rank-<R>/; the summary across ranks (a collective)."""
    from hetmem.distributed import memory_summary

    if engine.data_parallel is None:
        return
    if engine.recorder is not None:
        engine.memory_report().save(_rank_dir(engine, out))
    summary = memory_summary(engine)
    if engine.data_parallel.rank == 0:
        print(f"data parallel: {summary['world_size']} ranks; optimizer state per rank "
              + ", ".join(format_bytes(r["optimizer_state_bytes"]) for r in summary["ranks"])
              + f" (total {format_bytes(summary['optimizer_state_bytes_total'])}); peak device bytes per rank "
              + ", ".join(format_bytes(r["peak_device_bytes"]) for r in summary["ranks"])
              + "; bytes sent per rank " + ", ".join(format_bytes(r["comm_sent_bytes"]) for r in summary["ranks"]))


def _rank_dir(engine, out: Path) -> Path:
    folder = out / f"rank-{engine.data_parallel.rank}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _how_to_resume(out: Path) -> str:
    from hetmem.train_job import CHECKPOINTS

    latest = out / CHECKPOINTS / "latest"
    if not latest.is_file():
        return "no checkpoint was written (train with --save-every N to be able to resume)"
    return f"`hetmem train --resume {out}` continues from its checkpoint {latest.read_text().strip()}"


def _train_with_progress(engine, options, scheduler, state, checkpoint_dir: Path, args) -> None:
    """The bar starts after the first step, which warms up (the tracer measures the step's
    memory under a conservative budget) and is slower than the rest: an ETA from it would lie."""
    from tqdm import tqdm

    from hetmem.train_job import train

    if state.step < options.steps:
        print(f"step {state.step + 1}: warm-up (hetmem measures the memory of one step)...", flush=True)
    every = max(1, options.steps // 10)
    first = state.step + 1
    bar = None
    try:
        for m in train(engine, options, scheduler, state, checkpoint_dir=checkpoint_dir):
            if args.no_progress:
                if m.step % every == 0 or m.step == first:
                    print(f"step {m.step}/{options.steps} loss {m.loss:.3f} lr {m.lr:.2e} "
                          f"{m.tokens_per_s:,.0f} tok/s peak device {format_bytes(m.peak_device_bytes)}")
                continue
            if bar is None:
                bar = tqdm(total=options.steps, initial=m.step, unit="step", dynamic_ncols=True)
            else:
                bar.update(1)
            bar.set_postfix(loss=f"{m.loss:.3f}", lr=f"{m.lr:.1e}", tok_s=f"{m.tokens_per_s:,.0f}",
                            peak=format_bytes(m.peak_device_bytes))
    finally:
        if bar is not None:
            bar.close()


def _finish(engine, options, state, cfg, out: Path, args) -> None:
    from hetmem.train_job import sample

    report = engine.memory_report().with_losses(state.losses)
    report.save(out)
    _finish_rank(engine, out)
    paths = report.render_all(out)
    budget = engine.budgets.device
    print()
    print(report.to_text())
    print()
    if state.losses:
        last = state.losses[-1]
        peak = engine.scheduler.peak_total
        print(f"final loss {last['loss']:.3f} after {last['step']} steps; peak device bytes "
              f"{format_bytes(peak)} of {format_bytes(budget)} ({'within' if peak <= budget else 'OVER'} budget)")
    if args.sample > 0:
        print("sample:", repr(sample(engine, "We the People", args.sample, cfg.block_size, seed=options.seed)))
    print(f"report: {out}/ ({', '.join(p.name for p in paths.values())})")
