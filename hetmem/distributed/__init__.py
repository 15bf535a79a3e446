"""Data-parallel training over torch.distributed: chunk groups owned by ranks.

When a process group with more than one rank is initialized before ``hetmem.initialize``, the
engine holds a ``DataParallel`` (``engine.data_parallel``; None otherwise) and:

- checks that every rank built the same model, layout, config and optimizer groups
  (ownership.py: a mismatch names the rank and the first difference);
- gives each trainable chunk group one owner, balanced by bytes (ownership.py); a rank creates
  optimizer state (MASTER, EXP_AVG, EXP_AVG_SQ) only for the groups it owns;
- at each accumulation boundary reduces each group's gradient to its owner, agrees on the
  global norm and on a non-finite step, updates its own groups with the CPU Adam and
  broadcasts them (sharded_step.py, the seams in hetmem/optimizer.py);
- saves checkpoints from every rank in parallel, loadable at any world size (checkpoint.py);
- gives full fp32 weights on every rank from ``engine.state_dict()`` (state.py).

By default parameters are replicated: every rank keeps every PARAM chunk (in the compute dtype),
placed by its own scheduler under its own device budget.  With ``shard_params`` (Stage 2,
gather.py) a rank keeps only its own groups' PARAM chunks between uses and gathers the others
from their owners before each use, along the schedule every rank agreed on.  See README
"Data parallel".
"""
from __future__ import annotations

import logging

from hetmem.chunk_manager.states import ChunkKind
from hetmem.materialize import OPTIMIZER_STATE

from .comm import CollectiveError, Comm
from .context import DistContext
from .ownership import assign_owners, check_same_layout
from .sharded_step import ScheduleDivergence, ShardedStep

logger = logging.getLogger("hetmem.distributed")

INITIAL_SYNC_IN_FLIGHT = 4   # chunk groups broadcast at once by sync_initial_state

__all__ = ["CollectiveError", "DataParallel", "DistContext", "ScheduleDivergence", "memory_summary"]


class DataParallel:
    """What the engine holds when it trains data-parallel; built by ``from_torch()``."""

    def __init__(self, ctx: DistContext):
        self.ctx = ctx
        self.comm = Comm(ctx)                 # every collective goes through it (bytes, waits, errors)
        self.owners: dict[int, int] = {}      # trainable group index -> owning rank, set by plan()
        self.step: ShardedStep | None = None  # the optimizer's seams, set by sharded_step()
        self.gather = None                    # ParamGather under shard_params (gather.py), else None

    @classmethod
    def from_torch(cls, compute_device) -> "DataParallel | None":
        ctx = DistContext.from_torch(compute_device)
        if ctx is None:
            return None
        logger.info("hetmem data parallel: %s, timeout %s", ctx.describe(), ctx.timeout)
        return cls(ctx)

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    def plan(self, layout, config, param_groups) -> set[int]:
        """Check the ranks agree, choose owners; the group indices this rank owns."""
        check_same_layout(self.comm, layout, config, param_groups)
        self.owners = assign_owners(layout, self.world_size)
        owned = {i for i, r in self.owners.items() if r == self.rank}
        logger.info("rank %d owns chunk groups %s of %d trainable", self.rank, sorted(owned), len(self.owners))
        return owned

    def sync_initial_state(self, layout, manager, module) -> None:
        """Make every replica start from the same values, as DistributedDataParallel does at
        construction: each trainable group's PARAM chunk from its owner (whose master the values
        came from), frozen groups and the module's buffers from rank 0.  A few groups in flight
        at a time, so the pinned chunks stay within the host budget when the rest is on NVMe."""
        pending = []
        for group in layout.groups:
            if len(pending) >= INITIAL_SYNC_IN_FLIGHT:
                pending.pop(0).wait()
            chunk = group.chunks[ChunkKind.PARAM]
            payload = manager.payload_in_memory(chunk)
            manager.pin(chunk)
            manager.mark_dirty(chunk)
            source = self.owners[group.index] if group.trainable else 0
            pending.append(self.comm.broadcast(payload.narrow(0, 0, group.used), source,
                                               f"the initial weights of chunk group {group.index}",
                                               on_done=lambda chunk=chunk: manager.unpin(chunk)))
        for name, buffer in module.named_buffers():
            pending.append(self.comm.broadcast(buffer.data, 0, f"the initial value of buffer {name!r}"))
        for work in pending:
            work.wait()

    def shard_params(self, manager, scheduler, *, prefetch: bool) -> None:
        """Stage 2 (config ``shard_params``): keep only the owned groups' PARAM chunks between
        uses; gather the others from their owners along the agreed schedule (gather.py)."""
        from .gather import ParamGather, drop_unowned

        self.step.publish = False
        self.gather = scheduler.gather = ParamGather(self.comm, manager, self.owners, self.rank,
                                                     lambda: self.step.agreed, scheduler.chunk_budget,
                                                     prefetch=prefetch)
        dropped = drop_unowned(manager, self.owners, self.rank)
        logger.info("rank %d: parameter chunks sharded (Stage 2): %d groups of other ranks dropped, gathered "
                    "before use", self.rank, dropped)

    def gather_all(self, layout) -> None:
        """Under shard_params: every trainable group's PARAM chunk gathered on this rank and kept
        (``engine.close()`` gives the module its full weights); a collective.  No-op otherwise."""
        if self.gather is not None:
            self.gather.acquire([g.chunks[ChunkKind.PARAM] for g in layout.groups if g.trainable])

    def owns(self, group) -> bool:
        return self.owners.get(group.index) == self.rank

    def sharded_step(self, manager, schedule) -> ShardedStep:
        self.step = ShardedStep(self.ctx, self.comm, manager, self.owners, schedule)
        return self.step

    # -- data ----------------------------------------------------------------------------

    def slice_batch(self, batch):
        """This rank's equal share of a batch every rank drew (dimension 0)."""
        n = batch.shape[0] // self.world_size
        return batch[self.rank * n:(self.rank + 1) * n]

    def mean(self, value) -> float:
        """The mean over ranks of a scalar (a loss): a small all-reduce."""
        import torch

        total = torch.tensor([float(value.detach() if isinstance(value, torch.Tensor) else value)],
                             dtype=torch.float64)
        return float(self.comm.all_reduce(total, "the mean of a scalar over ranks")[0]) / self.world_size

    # -- state ---------------------------------------------------------------------------

    def full_state_dict(self, module_state, layout, manager):
        from .state import full_state_dict

        return full_state_dict(self, module_state, layout, manager)

    def save_checkpoint(self, parts, directory, **kwargs):
        from .checkpoint import save_checkpoint

        return save_checkpoint(self, parts, directory, **kwargs)

    # -- reports -------------------------------------------------------------------------

    def rank_report(self, report):
        """The rank's memory report, its rank and ownership in ``meta.data_parallel``."""
        report.trace["meta"]["data_parallel"] = {"rank": self.rank, "world_size": self.world_size,
                                                 "owned_groups": sorted(i for i, r in self.owners.items()
                                                                        if r == self.rank)}
        return report


def optimizer_state_bytes(manager) -> int:
    """Bytes of this rank's MASTER, EXP_AVG and EXP_AVG_SQ chunks (wherever they live)."""
    return sum(c.nbytes for c in manager.chunks if c.kind in OPTIMIZER_STATE)


def memory_summary(engine) -> dict:
    """Every rank's memory figures and their totals; a collective: call it on every rank."""
    from hetmem.chunk_manager.states import Tier

    manager = engine.manager
    mine = {"rank": 0, "optimizer_state_bytes": optimizer_state_bytes(manager),
            "param_bytes": sum(c.nbytes for c in manager.chunks if c.kind is ChunkKind.PARAM),
            "host_chunk_bytes": manager.bytes_on(Tier.HOST), "peak_device_bytes": engine.scheduler.peak_total,
            "device_budget": engine.budgets.device}
    dp = engine.data_parallel
    if dp is None:
        ranks = [mine]
    else:
        mine["rank"] = dp.rank
        mine["comm_sent_bytes"] = dp.comm.sent_bytes
        mine["comm_wait_s"] = dp.comm.wait_s
        ranks = dp.comm.all_gather_object(mine, "the memory summary")
    return {"world_size": len(ranks), "ranks": ranks,
            "optimizer_state_bytes_total": sum(r["optimizer_state_bytes"] for r in ranks),
            "peak_device_bytes_max": max(r["peak_device_bytes"] for r in ranks),
            "within_budget": all(r["peak_device_bytes"] <= r["device_budget"] for r in ranks)}
