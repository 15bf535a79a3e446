"""Stage 2 (``shard_params: true``): a rank keeps only the PARAM chunks of the groups it owns.

The PARAM chunk of a trainable group another rank owns is *dropped* (its payload freed,
``chunk.tier is None``) except while a module uses it.  Before a module's forward or backward
uses such a group the chunk is *gathered*: broadcast from its owner into a fresh placement on
this rank (on the device when the chunk budget has room now, else in host memory, whence the
scheduler moves it as any fetched chunk).  After its last use it is dropped instead of evicted.

The order of collectives must be the same on every rank, so nothing here looks at residency,
budgets or timing; every decision is a function of the sequence of scheduler events (the
moments, the chunks each acquires and releases: the same on every rank, as the schedule
fingerprint check at each step verifies) and of the *agreed plan*, the traced schedule all
ranks had at the last step (``ShardedStep.agreed``, equal fingerprints on every rank):

- ``acquire`` (a moment, or a late fetch, needs chunks): each needed group not *live* is
  gathered now (issued for all, then waited); a live one whose gather is in flight is waited.
  The owner takes part in every broadcast (it sends), at the same point, whether or not its
  own copy is on the device.
- ``prefetch`` (after a moment's chunks are in place): while the moments so far matched the
  plan, the groups of the planned next moment that are not live are gathered *early*: issued
  now, waited at their use (``acquire``).  A mismatch stops prefetching for the micro-step on
  every rank alike (the moment keys are the same everywhere).
- ``release`` (a use ended): a group no use holds any more that the planned next moment does
  not need is dropped (on a non-owner: the payload freed).
- ``end`` (end of a micro-step, or an abort): every gather is waited and every group dropped, so
  between steps a rank holds the PARAM chunks of its own groups only; the optimizer updates
  them there and nothing is broadcast after the step (``ShardedStep(publish=False)``).

Frozen groups have no owner and stay replicated.  See README "Data parallel".
"""
from __future__ import annotations

import logging

from hetmem.chunk_manager.chunk import Chunk
from hetmem.chunk_manager.manager import ChunkManager
from hetmem.chunk_manager.states import ChunkKind, Tier

from .comm import Comm, Pending

logger = logging.getLogger("hetmem.distributed")


class ParamGather:
    def __init__(self, comm: Comm, manager: ChunkManager, owners: dict[int, int], rank: int,
                 agreed, chunk_budget, *, prefetch: bool):
        self.comm = comm
        self.manager = manager
        self.owners = owners              # group index -> owning rank (trainable groups: the gathered ones)
        self.rank = rank
        self._agreed = agreed             # () -> the schedule every rank agreed on at the last step, or None
        self._chunk_budget = chunk_budget  # () -> device bytes chunks may use now (where a gather lands)
        self.prefetch_enabled = prefetch
        self.live: set[int] = set()       # gathered group indices (the same set on every rank)
        self.users: dict[int, int] = {}   # group index -> uses holding it (acquires not yet released)
        self.pending: dict[int, Pending] = {}  # group index -> its gather in flight
        self.plan = None                  # the agreed schedule for this micro-step, while it matches
        self.index: int | None = None     # the current moment's index in the plan
        self.gathers = 0                  # broadcasts this rank took part in (all, since initialize)
        self.early = 0                    # of them issued ahead of their use (prefetched)
        self.drops = 0                    # payloads freed after use (non-owned groups)
        self._by_id = {c.id: c for c in manager.chunks}
        self._groups = {g.index: g for g in manager.groups}
        self._unreleased: set[int] = set()  # dropped while something else still pinned it: freed later

    def sharded(self, chunk: Chunk) -> bool:
        return chunk.kind is ChunkKind.PARAM and chunk.group.index in self.owners

    def owns(self, index: int) -> bool:
        return self.owners[index] == self.rank

    # -- scheduler events -----------------------------------------------------------------

    def begin(self) -> None:
        """A micro-step starts: follow the agreed plan (None before the first step)."""
        self.plan = self._agreed()
        self.index = None

    def on_moment(self, kind, module: str, index: int | None) -> None:
        """A moment began (``index`` None outside a recorded micro-step): still on the plan?"""
        plan = self.plan
        if plan is None or index is None:
            self.plan = self.index = None
            return
        record = plan[index] if index < len(plan) else None
        if record is None or record.key != (kind, module):
            logger.info("rank %d: moment %s is %s %r, not the agreed schedule's; gathering at use for the rest "
                        "of the micro-step", self.rank, index, getattr(kind, "value", kind), module)
            self.plan = self.index = None
            return
        self.index = index

    def acquire(self, chunks: list[Chunk]) -> None:
        sharded = [c for c in chunks if self.sharded(c)]
        for chunk in sharded:
            self._gather(chunk.group)
        for chunk in sharded:
            index = chunk.group.index
            self._land(index)
            self.users[index] = self.users.get(index, 0) + 1

    def prefetch(self) -> None:
        if not self.prefetch_enabled or self.plan is None or self.index is None:
            return
        upcoming = self.plan[self.index + 1] if self.index + 1 < len(self.plan) else None
        if upcoming is None:
            return
        for index in self._groups_of(upcoming):
            if index not in self.live:
                self._gather(self._groups[index])
                self.early += 1

    def release(self, chunks: list[Chunk]) -> None:
        needed = self._next_groups()
        for chunk in chunks:
            if not self.sharded(chunk):
                continue
            index = chunk.group.index
            self.users[index] = self.users.get(index, 0) - 1
            if self.users[index] <= 0 and index not in needed:
                self._drop(index)

    def abort(self) -> None:
        """After an exception mid-step (the scheduler has dropped every pin): let the gathers in
        flight finish (an error is logged: the rank is failing already) and drop everything."""
        for index in sorted(self.pending):
            work = self.pending[index]
            work.on_done = None
            try:
                work.wait()
            except Exception as exc:  # noqa: BLE001 - the step already failed; this is its cleanup
                logger.warning("rank %d: a gather in flight failed during an abort: %s", self.rank, exc)
        self.pending.clear()
        self.end()

    def end(self) -> None:
        """Wait for every gather, drop every group (end of micro-step, abort, before a step)."""
        try:
            for index in sorted(self.pending):
                self._land(index)
        finally:
            self.pending.clear()
            for index in sorted(self.live):
                self.users[index] = 0
                self._drop(index)
            self.users.clear()
            self.plan = self.index = None
            self._free_unreleased()

    # -- the collectives --------------------------------------------------------------------

    def _gather(self, group) -> None:
        index = group.index
        if index in self.live:
            return
        chunk = group.chunks[ChunkKind.PARAM]
        owner = self.owners[index]
        if self.owns(index):
            payload = self.manager.payload_in_memory(chunk)
        else:
            self._free_unreleased()
            if chunk.tier is not None:
                raise RuntimeError(f"hetmem data parallel: rank {self.rank}: {chunk.name} of chunk group {index} "
                                   f"(owned by rank {owner}) is still held before its gather")
            room = self.manager.bytes_on(Tier.DEVICE) + chunk.nbytes <= self._chunk_budget()
            self.manager.place(chunk, Tier.DEVICE if room else Tier.HOST)
            payload = chunk.payload
        self.manager.pin(chunk)   # nothing moves it while the backend reads or writes it
        self.manager.mark_dirty(chunk)
        self.live.add(index)
        self.gathers += 1
        self.pending[index] = self.comm.broadcast(
            payload.narrow(0, 0, group.used), owner, f"the gather of the parameters of chunk group {index}",
            on_done=lambda chunk=chunk: self.manager.unpin(chunk))

    def _land(self, index: int) -> None:
        work = self.pending.pop(index, None)
        if work is not None:
            try:
                work.wait()
            except BaseException:
                self.manager.unpin(self._groups[index].chunks[ChunkKind.PARAM])
                raise

    def _drop(self, index: int) -> None:
        self._land(index)
        self.live.discard(index)
        self.users.pop(index, None)
        if not self.owns(index):
            self._unreleased.add(index)
            self._free_unreleased()

    def _free_unreleased(self) -> None:
        for index in sorted(self._unreleased):
            chunk = self._groups[index].chunks[ChunkKind.PARAM]
            if not chunk.pins:  # (a saved view rebuilt off schedule may hold it until the next moment)
                self._unreleased.discard(index)
                self.manager.release(chunk)
                self.drops += 1

    # -- the plan ---------------------------------------------------------------------------

    def _groups_of(self, record) -> list[int]:
        chunks = self._by_id
        return sorted({chunks[i].group.index for i in record.working_set
                       if i in chunks and self.sharded(chunks[i])})

    def _next_groups(self) -> set[int]:
        if self.plan is None or self.index is None or self.index + 1 >= len(self.plan):
            return set()
        return set(self._groups_of(self.plan[self.index + 1]))


def drop_unowned(manager: ChunkManager, owners: dict[int, int], rank: int) -> int:
    """Free the PARAM chunks of the trainable groups other ranks own (after the initial sync);
    returns how many."""
    dropped = 0
    for group in manager.groups:
        if group.index in owners and owners[group.index] != rank:
            manager.wait(group.chunks[ChunkKind.PARAM])
            manager.release(group.chunks[ChunkKind.PARAM])
            dropped += 1
    return dropped


def held_param_bytes(manager: ChunkManager) -> int:
    """Bytes of PARAM chunk payloads this rank holds now (any tier)."""
    return sum(c.nbytes for c in manager.chunks if c.kind is ChunkKind.PARAM and c.tier is not None)
