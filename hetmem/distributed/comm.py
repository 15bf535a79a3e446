"""The collectives hetmem runs, each issued and waited as two calls, with bytes counted.

``Comm`` wraps ``torch.distributed`` for one ``DistContext``: ``reduce`` / ``broadcast`` return a
``Pending`` (issue now, ``wait()`` later: the work runs in the backend's threads meanwhile);
``all_reduce`` / ``all_gather`` are small and synchronous.  A tensor that is not where the
backend needs it (a host chunk under NCCL) goes through a staging copy on the backend's device;
the copy back happens at ``wait()``.

Bytes: ``sent_bytes`` counts what this rank sends under the algorithm gloo runs for each
collective, for a tensor of B bytes on N ranks: reduce, a ring reduce-scatter ((N-1)/N of B
from every rank) then each non-root rank's reduced share to the root (B/N more); broadcast,
the root sends B to each other rank; all-reduce (ring), 2(N-1)/N of B; all-gather, its own
part to each other rank.  benchmarks/distributed_comm.py compares this with the bytes the
process really wrote to its sockets (at N=2).

Failure: a collective that raises (a peer died: the connection closes; a peer stopped: the
process group's timeout) becomes a ``CollectiveError`` naming this rank, what was being
communicated and the timeout, so no rank hangs past the timeout and none fails silently.
"""
from __future__ import annotations

import logging
import time
from collections import Counter

import torch
import torch.distributed as dist

from .context import DistContext

logger = logging.getLogger("hetmem.distributed")


class CollectiveError(RuntimeError):
    """A collective failed or timed out: another rank died, stopped, or diverged."""


class Pending:
    """A collective in flight; ``wait()`` blocks until it completed (once)."""

    def __init__(self, comm: "Comm", work, what: str, staged: torch.Tensor | None = None,
                 target: torch.Tensor | None = None, on_done=None):
        self.comm = comm
        self.work = work              # the backend's Work handle
        self.what = what              # named in errors
        self.staged = staged          # the staging copy the backend works on (None: it works on target)
        self.target = target          # where the result goes when staged
        self.on_done = on_done        # called once after a successful wait (e.g. unpin a chunk)
        self.done = False

    def wait(self) -> None:
        if self.done:
            return
        started = time.perf_counter()
        try:
            self.work.wait()
        except Exception as exc:  # noqa: BLE001 - every backend error means the same to the caller
            self.done = True
            raise self.comm.failed(self.what, exc) from exc
        finally:
            self.comm.wait_s += time.perf_counter() - started
        self.done = True
        if self.staged is not None:
            self.target.copy_(self.staged)
        if self.on_done is not None:
            self.on_done()


class Comm:
    def __init__(self, ctx: DistContext):
        self.ctx = ctx
        self.sent_bytes = 0            # bytes this rank sent, by the textbook algorithms (module docstring)
        self.sent_by_op: Counter = Counter()  # the same, per collective name
        self.wait_s = 0.0              # seconds this rank spent blocked on collectives

    # -- errors --------------------------------------------------------------------------

    def failed(self, what: str, exc: BaseException) -> CollectiveError:
        ctx = self.ctx
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return CollectiveError(
            f"hetmem data parallel: rank {ctx.rank} of {ctx.world_size} could not complete {what} "
            f"({ctx.backend}: {first_line}). Another rank has probably died, or stopped calling the same "
            f"engine steps (a collective waits at most the process group's timeout, "
            f"{ctx.timeout.total_seconds():g} s). Check the other ranks' logs; restart the job from the last "
            f"checkpoint")

    def _count(self, op: str, nbytes: float) -> None:
        self.sent_bytes += int(nbytes)
        self.sent_by_op[op] += int(nbytes)

    def _stage(self, tensor: torch.Tensor) -> torch.Tensor | None:
        device = self.ctx.comm_device
        if tensor.device == device:
            return None
        return tensor.to(device, copy=True)

    def _issue(self, fn, what: str):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            raise self.failed(what, exc) from exc

    # -- asynchronous --------------------------------------------------------------------

    def reduce(self, tensor: torch.Tensor, dst: int, what: str, on_done=None) -> Pending:
        """SUM of every rank's ``tensor`` into ``dst``'s (others' are left unspecified)."""
        staged = self._stage(tensor)
        work = self._issue(lambda: dist.reduce(tensor if staged is None else staged, dst, op=dist.ReduceOp.SUM,
                                               group=self.ctx.group, async_op=True), what)
        world, nbytes = self.ctx.world_size, tensor.numel() * tensor.element_size()
        self._count("reduce", (world - 1) / world * nbytes + (nbytes / world if self.ctx.rank != dst else 0))
        return Pending(self, work, what, staged, tensor, on_done)

    def broadcast(self, tensor: torch.Tensor, src: int, what: str, on_done=None) -> Pending:
        """``src``'s ``tensor`` into every rank's."""
        staged = self._stage(tensor)
        work = self._issue(lambda: dist.broadcast(tensor if staged is None else staged, src, group=self.ctx.group,
                                                  async_op=True), what)
        if self.ctx.rank == src:
            self._count("broadcast", (self.ctx.world_size - 1) * tensor.numel() * tensor.element_size())
        return Pending(self, work, what, staged, tensor, on_done)

    # -- synchronous (small) -------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, what: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
        staged = self._stage(tensor)
        work = self._issue(lambda: dist.all_reduce(tensor if staged is None else staged, op=op,
                                                   group=self.ctx.group, async_op=True), what)
        world = self.ctx.world_size
        self._count("all_reduce", 2 * (world - 1) / world * tensor.numel() * tensor.element_size())
        Pending(self, work, what, staged, tensor).wait()
        return tensor

    def all_gather(self, tensor: torch.Tensor, what: str) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on each), in rank order."""
        device = self.ctx.comm_device
        source = tensor.to(device)
        out = [torch.empty_like(source) for _ in range(self.ctx.world_size)]
        work = self._issue(lambda: dist.all_gather(out, source, group=self.ctx.group, async_op=True), what)
        self._count("all_gather", (self.ctx.world_size - 1) * tensor.numel() * tensor.element_size())
        Pending(self, work, what).wait()
        return [t.to(tensor.device) for t in out]

    def all_gather_object(self, obj, what: str) -> list:
        """Small picklable objects (descriptions for error messages), in rank order."""
        out = [None] * self.ctx.world_size
        started = time.perf_counter()
        try:
            dist.all_gather_object(out, obj, group=self.ctx.group)
        except Exception as exc:  # noqa: BLE001
            raise self.failed(what, exc) from exc
        finally:
            self.wait_s += time.perf_counter() - started
        return out

    def barrier(self, what: str) -> None:
        self.all_reduce(torch.zeros(1), what)
