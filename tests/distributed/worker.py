"""One rank of a distributed test: ``python -m tests.distributed.worker SCENARIO OUT [key=value ...]``
with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set (tests/distributed/launcher.py, or torchrun).
Each rank trains on its slice of every batch and writes its results to OUT/rank<R>.pt."""
from __future__ import annotations

import copy
import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import hetmem
from hetmem.chunk_manager.states import ChunkKind, Tier
from hetmem.distributed import memory_summary
from hetmem.distributed import optimizer_state_bytes
from hetmem.distributed.gather import held_param_bytes
from tests.engine.helpers import batches, config, steady_steps, tiny_gpt

TIGHT = "2304KiB"


def shard(batch, rank: int, world: int):
    x, y = batch
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def mean_loss(loss: torch.Tensor) -> float:
    value = loss.detach().double().reshape(1).clone()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


def engine_config(opts: dict) -> hetmem.Config:
    overrides = dict(device_budget=opts.get("budget", TIGHT), dtype=opts.get("dtype", "fp32"),
                     gradient_accumulation_steps=int(opts.get("accumulation", 1)))
    if "clip" in opts:
        overrides["gradient_clipping"] = float(opts["clip"])
    if opts.get("shard") == "1":
        overrides["shard_params"] = True
    if opts.get("dtype", "fp32") != "fp32":
        overrides["optimizer"] = dict(lr=1e-3, weight_decay=0.0)
    return config(**overrides)


def with_variety(model):
    """Frozen (ln_f), tied (head = wte, the GPT's own) and unused (an extra Linear) parameters."""
    for p in model.ln_f.parameters():
        p.requires_grad_(False)
    model.unused = torch.nn.Linear(4, 4)
    return model


def adamw_groups(model):
    """Two param groups (weight decay on matrices only, another lr)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1, "lr": 1e-3},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": 3e-3}])


def lr_factor(step: int) -> float:
    return 1.0 / (1.0 + 0.5 * step)


def train(engine, data, rank, world, scheduler=None, held=None):
    """``held``: a list that gets the PARAM bytes this rank holds after each step."""
    losses = []
    for batch in data:
        x, y = shard(batch, rank, world)
        loss = engine(x, y)
        engine.backward(loss)
        if engine.step() and scheduler is not None:
            scheduler.step()
        losses.append(mean_loss(loss))
        if held is not None:
            held.append(held_param_bytes(engine.manager))
    return losses


def train_ddp(model, data, rank, world, *, clip=None, accumulation=1, variety=False):
    """DistributedDataParallel + torch.optim.AdamW, the reference."""
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=variety)
    opt = adamw_groups(model) if variety else torch.optim.AdamW(ddp.parameters(), lr=1e-3, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor) if variety else None
    losses = []
    for i, batch in enumerate(data):
        x, y = shard(batch, rank, world)
        loss = ddp(x, y)
        (loss / accumulation).backward()
        losses.append(mean_loss(loss))
        if (i + 1) % accumulation == 0:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_([p for p in ddp.parameters() if p.requires_grad], clip)
            opt.step()
            opt.zero_grad()
            if scheduler is not None:
                scheduler.step()
    return losses


def scenario_parity(rank, world, opts):
    steps = int(opts.get("steps", 8))
    variety = opts.get("variety", "0") == "1"
    data = batches(steps, batch_size=4, seed=int(opts.get("seed", 0)))
    model = tiny_gpt(0, bias=True)
    if variety:
        model = with_variety(model)
    reference = copy.deepcopy(model)
    engine = hetmem.initialize(model, engine_config(opts), optimizer=adamw_groups(model) if variety else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lr_factor) if variety else None
    held = []
    losses = train(engine, data, rank, world, scheduler, held)
    gather = engine.data_parallel.gather
    try:
        engine.optimizer.state_dict()
        optimizer_error = None
    except RuntimeError as exc:
        optimizer_error = str(exc)
    result = {"losses": losses, "state": engine.state_dict(),
              "module_state": engine.module.state_dict() if gather is None else None,
              "held_param_bytes": held, "gathers": None if gather is None else (gather.gathers, gather.early),
              "param_bytes": {kind: sum(g.chunks[ChunkKind.PARAM].nbytes for g in engine.layout.groups if test(g))
                              for kind, test in (("all", lambda g: True), ("frozen", lambda g: not g.trainable),
                                                 ("owned", engine.data_parallel.owns))},
              "largest_param_chunk": max(g.chunks[ChunkKind.PARAM].nbytes for g in engine.layout.groups),
              "comm_by_op": dict(engine.data_parallel.comm.sent_by_op),
              "evictions": [len(s["evictions"]) for s in steady_steps(engine)],
              "fetches": [sum(m["cause"] in ("fetch", "prefetch") for m in s["moves"]) for s in steady_steps(engine)],
              "optimizer_state_bytes": optimizer_state_bytes(engine.manager),
              "owners": engine.data_parallel.owners, "summary": memory_summary(engine),
              "report_meta": engine.memory_report().trace["meta"]["data_parallel"],
              "norm": engine.adam.last_norm, "global_step": engine.global_step, "optimizer_error": optimizer_error,
              "lrs": [g["lr"] for g in engine.optimizer.param_groups],
              "group_bytes": {g.index: g.capacity * 4 for g in engine.layout.groups if g.trainable}}
    engine.close()
    if opts.get("ddp", "1") == "1":
        result["ddp_losses"] = train_ddp(reference, data, rank, world, clip=float(opts["clip"]) if "clip" in opts
                                         else None, accumulation=int(opts.get("accumulation", 1)), variety=variety)
        result["ddp_state"] = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    return result


def scenario_resume(rank, world, opts):
    """Train ``first`` steps (or load ``load``), save to ``save``, train ``then`` more steps."""
    data = batches(int(opts["total"]), batch_size=4, seed=5)
    engine = hetmem.initialize(tiny_gpt(0), engine_config(opts))
    start = 0
    if "load" in opts:
        engine.load_checkpoint(opts["load"])
        start = engine.global_step
    first = int(opts.get("first", 0))
    losses = train(engine, data[start:start + first], rank, world)
    result = {}
    if "save" in opts:
        engine.save_checkpoint(opts["save"])
        result["state_at_save"] = engine.state_dict()
    losses += train(engine, data[start + first:start + first + int(opts.get("then", 0))], rank, world)
    result.update(losses=losses, state=engine.state_dict())
    engine.close()
    return result


def scenario_die(rank, world, opts):
    """Rank 1 dies (or, with how=stall, stops without dying) after the first step; the others
    go on training."""
    data = batches(6, batch_size=4, seed=6)
    engine = hetmem.initialize(tiny_gpt(0), engine_config(opts))
    for i, batch in enumerate(data):
        if rank == 1 and i == 1:
            if opts.get("how") == "stall":
                time.sleep(600)
            os._exit(3)
        x, y = shard(batch, rank, world)
        engine.backward(engine(x, y))
        engine.step()
    return {}


def scenario_checks(rank, world, opts):
    """initialize() where the ranks disagree (each must raise ValueError), then with replicas
    initialized from different seeds (the engine makes them equal)."""
    errors = {}
    attempts = {"model": (tiny_gpt(0, d_model=96 if rank == 1 else 64), engine_config(opts)),
                "config": (tiny_gpt(0), engine_config(opts).replace(gradient_clipping=2.0 if rank == 1 else None)),
                "world": (tiny_gpt(0), engine_config(opts).replace(chunk_size=1 << 20))}
    for what, (model, cfg) in attempts.items():
        try:
            hetmem.initialize(model, cfg).close()
            errors[what] = None
        except ValueError as exc:
            errors[what] = str(exc)
    engine = hetmem.initialize(tiny_gpt(rank), engine_config(opts))   # different initial weights per rank
    state = engine.state_dict()
    engine.close()
    # one nvme_dir for both ranks, a host budget that spills: each rank swaps in its own subfolder,
    # and the losses are those of the run without NVMe
    data = batches(3, batch_size=4, seed=8)
    losses = {}
    for tier in ("memory", "nvme"):
        extra = dict(nvme_dir=opts["nvme"], host_budget="1MiB") if tier == "nvme" else {}
        engine = hetmem.initialize(tiny_gpt(0), engine_config(opts).replace(**extra))
        losses[tier] = train(engine, data, rank, world)
        if tier == "nvme":
            spilled = sum(c.nbytes for c in engine.manager.chunks if c.tier is Tier.NVME)
        engine.close()
    return {"errors": errors, "initial_state": state, "losses": losses, "spilled": spilled,
            "swap_folders": sorted(p.name for p in Path(opts["nvme"]).iterdir())}


class Branchy(torch.nn.Module):
    """Two layers whose order is the rank's choice: the traced schedules differ between ranks."""

    def __init__(self, swap: bool):
        super().__init__()
        self.a, self.b = torch.nn.Linear(90, 90), torch.nn.Linear(90, 90)
        self.swap = swap

    def forward(self, x):
        first, second = (self.b, self.a) if self.swap else (self.a, self.b)
        return second(torch.tanh(first(x))).square().mean()


def scenario_agreement(rank, world, opts):
    """Step 2's gradient is non-finite on rank 1 only (NaN in fp32, an fp16 overflow): every rank
    must skip it, keep its weights, and go on together.  Then ranks whose schedules differ."""
    results = {}
    for dtype, poison in (("fp32", float("nan")), ("fp16", 1e30)):
        engine = hetmem.initialize(tiny_gpt(0), engine_config({**opts, "dtype": dtype}))
        skipped, scales, states = [], [], []
        for i, batch in enumerate(batches(3, batch_size=4, seed=7)):
            x, y = shard(batch, rank, world)
            loss = engine(x, y)
            if i == 1 and rank == 1:
                loss = loss * poison
            engine.backward(loss)
            engine.step()
            skipped.append(engine.last_step.skipped)
            scales.append(engine.loss_scale)
            states.append(engine.state_dict())
        results[dtype] = {"skipped": skipped, "scales": scales, "states": states, "reason": engine.last_step.reason}
        engine.close()
    results["diverge"] = diverge(rank)
    return results


def diverge(rank: int) -> str | None:
    """Rank 1 runs its two layers in the other order: its traced schedule differs."""
    engine = hetmem.initialize(Branchy(swap=rank == 1), hetmem.Config(device="cpu", dtype="fp32", chunk_size=8192))
    x = torch.randn(4, 90)
    try:
        for _ in range(3):
            engine.backward(engine(x))
            engine.step()
    except RuntimeError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    opts = dict(a.split("=", 1) for a in sys.argv[3:])
    timeout = datetime.timedelta(seconds=float(opts.get("timeout", 60)))
    dist.init_process_group("gloo", timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    result = globals()[f"scenario_{scenario}"](rank, world, opts)
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
