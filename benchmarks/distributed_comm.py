"""Data-parallel communication: bytes each rank sends per step, measured against the theory
of the sharding, and the share of the step spent waiting on collectives.

N gloo ranks on this machine (``torch.multiprocessing``, a free port) train the same GPT, each
on 1/N of every batch.  Per steady step (warm-up excluded) each rank reports:

- ``measured_bytes``: bytes the process wrote to its sockets (``wchar`` of /proc/self/io: the
  gloo threads' writes; nothing else writes during a step here);
- ``theory_bytes``: what the ownership design sends (hetmem/distributed/sharded_step.py), from
  the layout: each trainable group's fp32 gradient (its used prefix) reduced to its owner,
  each owned group's PARAM broadcast, the gradient-flag all-gather and the norm all-reduce,
  costed with gloo's algorithms (hetmem/distributed/comm.py); with ``--shard-params`` (Stage 2,
  hetmem/distributed/gather.py) no broadcast after the step but one gather (a broadcast from
  the owner) of each group per run of consecutive moments of the traced schedule that use it
  (forward and backward), read from the schedule;
- ``counted_bytes``: hetmem's own counter (``Comm.sent_bytes``), the same theory applied to
  the collectives actually issued;
- ``comm_wait_share``: seconds blocked in collectives / step seconds.

A one-process run on the whole batch, in the same invocation, is the step-time baseline.

    python benchmarks/distributed_comm.py [--json] [--world 2] [--steps 8] [--shard-params]
"""
from __future__ import annotations

import argparse
import datetime
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

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hetmem
from hetmem.distributed.gather import held_param_bytes
from hetmem.corpus import load_corpus, random_batch
from hetmem.models.gpt import GPT, GPTConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="ranks (default: %(default)s)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="per step, all ranks together")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device-budget", default="6MiB", help="small enough that chunks move every step")
    p.add_argument("--chunk-size", type=int, default=65536, help="elements per chunk")
    p.add_argument("--steps", type=int, default=8, help="measured steps after 2 warm-up steps")
    p.add_argument("--shard-params", action="store_true", help="Stage 2: gather parameters before use")
    p.add_argument("--json", action="store_true")
    return p


def _wchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line")


def _engine(args) -> hetmem.Engine:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=args.block_size, n_layer=args.layers, n_head=4,
                          d_model=args.d_model))
    return hetmem.initialize(model, dict(device="cpu", device_budget=args.device_budget, dtype=args.dtype,
                                         chunk_size=args.chunk_size, gradient_clipping=1.0,
                                         shard_params=args.shard_params,
                                         optimizer=dict(lr=1e-3)))


def theory_bytes(engine) -> int:
    """Bytes this rank sends per step under the ownership design, from the layout alone."""
    dp = engine.data_parallel
    rank, world = dp.rank, dp.world_size
    gathers = uses_per_step(engine) if dp.gather is not None else {}
    trainable = [g for g in engine.layout.groups if g.trainable]
    param_bytes = engine.config.param_bytes
    sent = 0.0
    for group in trainable:
        grad = group.used * 4
        sent += (world - 1) / world * grad + (grad / world if dp.owners[group.index] != rank else 0)
        if dp.owners[group.index] == rank:
            sent += (world - 1) * group.used * param_bytes * (gathers.get(group.index, 0) if dp.gather else 1)
    flags = 2 + sum(len(g.slots) for g in trainable)
    sent += (world - 1) * flags * 8                 # gradient flags + schedule fingerprint, int64
    sent += 2 * (world - 1) / world * 8             # the norm, float64
    return int(sent)


def uses_per_step(engine) -> dict[int, int]:
    """Stage 2: group index -> runs of consecutive moments of the traced schedule using its PARAM chunk."""
    from hetmem.chunk_manager.states import ChunkKind

    by_id = {c.id: c for c in engine.manager.chunks}
    runs: dict[int, int] = {}
    previous: set[int] = set()
    for record in engine.tracer.store.schedule:
        now = {by_id[i].group.index for i in record.working_set
               if by_id[i].kind is ChunkKind.PARAM and by_id[i].group.trainable}
        for index in now - previous:
            runs[index] = runs.get(index, 0) + 1
        previous = now
    return runs


def _steps(engine, args, rank: int, world: int, measure: bool) -> list[dict]:
    data = load_corpus()
    generator = torch.Generator().manual_seed(1)
    dp = engine.data_parallel
    rows = []
    for step in range(2 + args.steps):
        x, y = random_batch(data, args.batch_size, args.block_size, generator)
        x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
        before = (_wchar(), dp.comm.sent_bytes, dp.comm.wait_s) if dp is not None else None
        gathered = dp.gather.gathers if dp is not None and dp.gather is not None else 0
        started = time.perf_counter()
        engine.backward(engine(x, y))
        engine.step()
        seconds = time.perf_counter() - started
        if step < 2 or not measure:
            rows.append({"seconds": seconds})
            continue
        rows.append({"seconds": seconds, "measured_bytes": _wchar() - before[0],
                     "gathers": None if dp.gather is None else dp.gather.gathers - gathered,
                     "counted_bytes": dp.comm.sent_bytes - before[1], "comm_wait_s": dp.comm.wait_s - before[2]})
    return rows[2:]


def _rank_main(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    engine = _engine(args)
    rows = _steps(engine, args, rank, world, measure=True)
    evictions = [len(s["evictions"]) for s in engine.recorder.steps if not s["warmup"]]
    result = {"rank": rank, "theory_bytes": theory_bytes(engine), "steps": rows,
              "owned_groups": sum(r == rank for r in engine.data_parallel.owners.values()),
              "groups": len(engine.data_parallel.owners), "evictions_per_step": statistics.median(evictions),
              "param_bytes_held": held_param_bytes(engine.manager)}
    engine.close()
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank_main, args=(args.world, _free_port(), args, out), nprocs=args.world, join=True)
        ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(args.world)]
    torch.set_num_threads(1)
    single = _steps(_engine(args), args, 0, 1, measure=False)
    summary = []
    for r in ranks:
        measured = statistics.median(s["measured_bytes"] for s in r["steps"])
        counted = statistics.median(s["counted_bytes"] for s in r["steps"])
        summary.append({"rank": r["rank"], "owned_groups": r["owned_groups"], "groups": r["groups"],
                        "theory_bytes": r["theory_bytes"], "counted_bytes": counted, "measured_bytes": measured,
                        "measured_over_theory": measured / r["theory_bytes"],
                        "step_s": statistics.median(s["seconds"] for s in r["steps"]),
                        "comm_wait_share": statistics.median(s["comm_wait_s"] / s["seconds"] for s in r["steps"]),
                        "evictions_per_step": r["evictions_per_step"], "param_bytes_held": r["param_bytes_held"],
                        "gathers_per_step": None if r["steps"][0]["gathers"] is None
                        else statistics.median(s["gathers"] for s in r["steps"])})
    return {"world": args.world, "dtype": args.dtype, "steps": args.steps, "shard_params": args.shard_params, "load_average": list(os.getloadavg()),
            "ranks": summary,
            "single_process_step_s": statistics.median(s["seconds"] for s in single),
            "step_time_ratio_vs_single": max(r["step_s"] for r in summary)
            / statistics.median(s["seconds"] for s in single)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.world} gloo ranks, {args.dtype}{', shard_params (Stage 2)' if args.shard_params else ''}, "
          f"median of {args.steps} steady steps")
    for r in result["ranks"]:
        print(f"rank {r['rank']} ({r['owned_groups']} of {r['groups']} groups): sent {r['measured_bytes']:,.0f} B/step "
              f"measured, {r['theory_bytes']:,} theory ({r['measured_over_theory']:.4f}x), counted "
              f"{r['counted_bytes']:,.0f}; waiting on communication {r['comm_wait_share']:.1%} of a "
              f"{r['step_s'] * 1e3:.0f} ms step; {r['evictions_per_step']:g} evictions/step; "
              f"{r['param_bytes_held']:,} B of parameter chunks held after the last step"
              + ("" if r["gathers_per_step"] is None else f"; {r['gathers_per_step']:g} gathers/step"))
    print(f"one process, whole batch: {result['single_process_step_s'] * 1e3:.0f} ms/step; slowest rank / one "
          f"process: {result['step_time_ratio_vs_single']:.2f}; load average "
          f"{', '.join(f'{x:.1f}' for x in result['load_average'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
