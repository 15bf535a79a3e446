"""The chunk manager: where every chunk is, byte accounting per tier, moves and eviction.

It places chunks, moves them between tiers (issue + wait, through ``Mover``), keeps each
parameter's ``.data`` a view of its PARAM chunk while that chunk is on the compute device
(and an empty placeholder otherwise), and evicts by the policy it is given.  It decides
nothing about *when*: the scheduler (hetmem/scheduler.py) calls it at each moment.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Iterable

import torch

from hetmem._core.units import format_bytes
from hetmem.accelerator import Accelerator

from .buffers import BufferPool
from .chunk import Chunk, ChunkGroup
from .eviction import EvictionPolicy
from .mover import Mover, Transfer
from .spill import spill_key
from .states import ChunkKind, ChunkState, IllegalTransition, TensorState, Tier, check_tier_move

logger = logging.getLogger("hetmem.chunk_manager")


_TIER_INDEX = {t: i for i, t in enumerate(Tier)}
_KIND_INDEX = {k: i for i, k in enumerate(ChunkKind)}


class DeviceBudgetError(ValueError):
    """The chunks a moment needs plus the non-model memory do not fit the device budget."""


class HostBudgetError(ValueError):
    """The chunks that must be in host memory at once do not fit host_budget."""


class ChunkEvents:
    """What the manager reports as it works; the recorder (report) overrides these."""

    def on_move(self, chunk: Chunk, src: Tier, dst: Tier, transfer: Transfer, cause: str) -> None:
        pass

    def on_evict(self, chunk: Chunk, src: Tier, dst: Tier, reason: str) -> None:
        pass


class ChunkManager:
    def __init__(self, groups: list[ChunkGroup], accelerator: Accelerator, *, events: ChunkEvents | None = None):
        self.groups = groups
        self.chunks: list[Chunk] = [c for g in groups for c in g.chunks.values()]
        self.accelerator = accelerator            # the compute device, through the seam
        self.device = accelerator.device          # where compute-device tensors live
        self.mover = Mover(accelerator)
        self.pool = BufferPool(accelerator)
        self.events = events or ChunkEvents()
        # bytes of chunk payloads per tier and kind, counting a transfer's destination from
        # its issue and its source until it completes (both buffers exist meanwhile)
        # (flat: tier-major, one counter per kind; read as a tuple snapshot by the recorder)
        self._counters = [0] * (len(Tier) * len(ChunkKind))
        self._tier_totals = {t: 0 for t in Tier}
        # data_ptr of device-resident PARAM payloads -> chunk (saved-tensor hooks look views up)
        self.device_storages: dict[int, Chunk] = {}
        # what a parameter's .data is while its chunk is not on the device
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}
        self.clock = 0                            # moment counter for LRU, advanced by the scheduler
        # transfers the compute stream waits on without a host sync (accelerators), until poll()
        # sees them complete (then their source buffer is released and un-accounted)
        self._unfinished: list[Transfer] = []
        self.nvme = None                          # NvmeTier once attach_nvme() ran
        self.host_limit: int | None = None        # chunk bytes allowed in host memory (NVMe tier on)
        self.spill_preference: Callable[[Chunk], tuple] | None = None  # replaces spill_key while set
        self.blocked_s = 0.0                      # host time blocked on transfers, in total
        self.moved_bytes = 0                      # bytes moved by transfers (issued), in total
        # where an evicted chunk goes (the NVMe tier replaces this to spill past host_budget)
        self.eviction_target: Callable[[Chunk], Tier] = lambda chunk: Tier.HOST

    # -- accounting --------------------------------------------------------------------

    def bytes_on(self, tier: Tier) -> int:
        return self._tier_totals[tier]

    def counters(self) -> tuple[int, ...]:
        """Bytes per (tier, kind), tier-major in Tier and ChunkKind order: a cheap snapshot."""
        return tuple(self._counters)

    def _account(self, tier: Tier, chunk: Chunk, sign: int) -> None:
        delta = sign * chunk.nbytes
        self._counters[_TIER_INDEX[tier] * len(ChunkKind) + _KIND_INDEX[chunk.kind]] += delta
        self._tier_totals[tier] += delta

    # -- placement ---------------------------------------------------------------------

    def place(self, chunk: Chunk, tier: Tier, data: torch.Tensor | None = None) -> None:
        """First placement of an unplaced chunk: zeros, or a copy of ``data`` (1-D)."""
        if chunk.tier is not None:
            raise IllegalTransition(f"{chunk.name} is already placed on {chunk.tier.value}")
        if tier is Tier.NVME:
            raise IllegalTransition(f"{chunk.name}: chunks are placed in memory first, then spilled")
        if tier is Tier.HOST:
            self.ensure_host_room(chunk.nbytes, protect=[chunk])
        buffer = self.pool.take(tier, chunk.dtype, chunk.capacity)
        if data is None:
            buffer.zero_()
        else:
            buffer[: data.numel()].copy_(data)
            buffer[data.numel():].zero_()
        chunk.payload, chunk.tier = buffer, tier
        chunk.nvme_valid = False
        self._account(tier, chunk, +1)
        if tier is Tier.DEVICE and chunk.kind is ChunkKind.PARAM:
            self.device_storages[buffer.untyped_storage().data_ptr()] = chunk

    def move(self, chunk: Chunk, dst: Tier, *, cause: str, optional: bool = False) -> Transfer:
        """Start moving ``chunk`` to ``dst`` (memory tiers; NVMe is the swap tier's job).

        ``optional``: a read ahead from NVMe whose failure is logged and puts the chunk back on
        NVMe without raising (``payload_in_memory`` then reads it again, for real)."""
        src = chunk.tier
        if src is None:
            raise IllegalTransition(f"{chunk.name} is not placed yet")
        if chunk.pins:
            raise IllegalTransition(f"{chunk.name} is in use ({chunk.pins} pins) and cannot move "
                                    f"{src.value} -> {dst.value}")
        self.wait(chunk)  # a chunk moves from where it has arrived
        src = chunk.tier   # a failed transfer may have put it back
        if src is dst:
            return Transfer(f"{chunk.name} already on {dst.value}", 0)
        check_tier_move(chunk.name, src, dst)
        if dst is Tier.HOST:
            self.ensure_host_room(chunk.nbytes, protect=[chunk])
        if Tier.NVME in (src, dst):
            return self._move_nvme(chunk, src, dst, cause, optional)
        if src is Tier.DEVICE and chunk.kind is ChunkKind.PARAM:
            self._unbind(chunk)
            self.device_storages.pop(chunk.payload.untyped_storage().data_ptr(), None)
        source = chunk.payload
        target = self.pool.take(dst, chunk.dtype, chunk.capacity)
        self._account(dst, chunk, +1)

        def finished(transfer: Transfer, chunk=chunk, source=source, src=src) -> None:
            self._account(src, chunk, -1)
            self.pool.give(src, source)

        transfer = self.mover.copy(target, source, f"{chunk.name} {src.value}->{dst.value}", finished,
                                   route=(src, dst))
        chunk.payload, chunk.tier, chunk.transfer = target, dst, transfer
        if dst is Tier.DEVICE and chunk.kind is ChunkKind.PARAM:
            self.device_storages[target.untyped_storage().data_ptr()] = chunk
        self.moved_bytes += chunk.nbytes
        self.events.on_move(chunk, src, dst, transfer, cause)
        return transfer

    def _move_nvme(self, chunk: Chunk, src: Tier, dst: Tier, cause: str, optional: bool = False) -> Transfer:
        if self.nvme is None:
            raise IllegalTransition(f"{chunk.name}: the NVMe tier is off (set nvme_dir to use it)")
        label = f"{chunk.name} {src.value}->{dst.value}"
        if dst is Tier.NVME:
            source = chunk.payload
            if chunk.nvme_valid:  # the blob is current: spilling writes nothing
                self._account(Tier.NVME, chunk, +1)
                self._account(Tier.HOST, chunk, -1)
                self.pool.give(Tier.HOST, source)
                chunk.payload, chunk.tier = None, Tier.NVME
                return Transfer(label + " (clean, no IO)", 0)

            def stored(transfer: Transfer, chunk=chunk, source=source) -> None:
                self._account(Tier.HOST, chunk, -1)
                self.pool.give(Tier.HOST, source)
                chunk.nvme_valid = True

            def store_failed(exc: BaseException, chunk=chunk, source=source) -> None:
                self._account(Tier.NVME, chunk, -1)
                chunk.tier, chunk.payload, chunk.transfer = Tier.HOST, source, None  # the bytes are still here
                logger.error("storing %s to NVMe failed; it stays in host memory: %s", chunk.name, exc)

            request = self.nvme.store(chunk, source)  # (raising, it changed nothing: the chunk stays here)
            self._account(Tier.NVME, chunk, +1)
            transfer = Transfer.for_request(request, label, chunk.nbytes, route=(src, dst), keepalive=(source,),
                                            on_done=stored, on_error=store_failed)
            chunk.tier, chunk.payload, chunk.transfer = Tier.NVME, None, transfer
        else:
            target = self.pool.take(Tier.HOST, chunk.dtype, chunk.capacity)

            def load_failed(exc: BaseException, chunk=chunk) -> None:
                self._account(Tier.HOST, chunk, -1)
                self._account(Tier.NVME, chunk, +1)
                chunk.tier, chunk.payload, chunk.transfer = Tier.NVME, None, None
                logger.error("loading %s from NVMe failed: %s", chunk.name, exc)

            try:
                request = self.nvme.load(chunk, target)
            except BaseException:  # nothing was issued: the chunk stays on NVMe, its buffer goes back
                self.pool.give(Tier.HOST, target)
                raise
            self._account(Tier.HOST, chunk, +1)
            self._account(Tier.NVME, chunk, -1)
            if optional:
                request = _Optional(request, chunk.name, "reading")
            loaded = _failed_read_handler(request, load_failed) if optional else None
            transfer = Transfer.for_request(request, label, chunk.nbytes, route=(src, dst), keepalive=(target,),
                                            on_done=loaded, on_error=load_failed)
            chunk.tier, chunk.payload, chunk.transfer = Tier.HOST, target, transfer
        self.moved_bytes += chunk.nbytes
        self.events.on_move(chunk, src, dst, transfer, cause)
        return transfer

    # -- the NVMe tier -----------------------------------------------------------------

    def attach_nvme(self, tier, host_limit: int) -> None:
        """Spill past ``host_limit`` chunk bytes to ``tier`` (an NvmeTier)."""
        self.nvme = tier
        self.host_limit = host_limit
        self.pool.host_allocator = tier.host_buffer

    def write_back(self, chunk: Chunk) -> Transfer:
        """Start writing a dirty chunk in host memory to its NVMe blob, keeping it where it is (its
        blob becomes current when the write lands; nothing may change the payload meanwhile).  A
        failed write-back is logged and changes nothing (the chunk stays dirty): no caller sees it."""
        self.wait(chunk)
        if chunk.nvme_valid or chunk.payload is None or chunk.payload.device.type != "cpu":
            return Transfer(f"{chunk.name} write-back (nothing to write)", 0)

        request = _Optional(self.nvme.store(chunk, chunk.payload), chunk.name, "writing back")

        def written(transfer: Transfer, chunk=chunk, request=request) -> None:
            chunk.nvme_valid = request.failed is None

        chunk.transfer = Transfer.for_request(request, f"{chunk.name} write-back", chunk.nbytes,
                                              route=(chunk.tier, chunk.tier), keepalive=(chunk.payload,),
                                              on_done=written)
        self.moved_bytes += chunk.nbytes
        return chunk.transfer

    def revert_to_blob(self, chunk: Chunk) -> None:
        """Forget the bytes memory holds for ``chunk``: its NVMe blob holds the ones wanted (a
        rolled-back speculative update, hetmem/speculation.py).  A host chunk gives its payload
        back (read again when next needed); one elsewhere in memory is reloaded in place.  A
        transfer of the bytes being forgotten that failed (a speculative write-back: logged where
        it failed, the chunk back in memory) loses nothing: they are dropped here anyway."""
        try:
            self.wait(chunk)
        except OSError as exc:
            logger.info("%s: a transfer of the bytes being reverted had failed (%s); reverting to its blob",
                        chunk.name, exc)
        if chunk.tier is Tier.NVME:
            chunk.nvme_valid = True
            return
        if chunk.tier is Tier.HOST and not chunk.pins:
            self._account(Tier.HOST, chunk, -1)
            self._account(Tier.NVME, chunk, +1)
            self.pool.give(Tier.HOST, chunk.payload)
            chunk.payload, chunk.tier = None, Tier.NVME
        else:
            self.nvme.load(chunk, chunk.payload).wait()
        chunk.nvme_valid = True

    def read_copy(self, chunk: Chunk, into: torch.Tensor) -> torch.Tensor:
        """The chunk's bytes copied into host tensor ``into`` without moving the chunk."""
        self.wait(chunk)
        if chunk.tier is Tier.NVME:
            self.nvme.load(chunk, into).wait()
        else:
            into.copy_(chunk.payload)
        return into

    def write_from(self, chunk: Chunk, data: torch.Tensor) -> None:
        """Set the chunk's bytes from host tensor ``data`` wherever the chunk lives."""
        self.wait(chunk)
        if chunk.tier is Tier.NVME:
            try:
                self.nvme.store(chunk, data).wait()
            except OSError:
                # the blob is invalid now: keep the new bytes in host memory (dirty, spilled
                # again later) so the chunk never points at bytes that are gone
                buffer = self.pool.take(Tier.HOST, chunk.dtype, chunk.capacity)
                buffer.copy_(data)
                self._account(Tier.NVME, chunk, -1)
                self._account(Tier.HOST, chunk, +1)
                chunk.payload, chunk.tier, chunk.nvme_valid = buffer, Tier.HOST, False
                raise
            chunk.nvme_valid = True
        else:
            chunk.payload.copy_(data)
            chunk.nvme_valid = False

    def copy_into(self, chunk: Chunk, target: torch.Tensor, source: torch.Tensor, label: str) -> Transfer:
        """Start copying device tensor ``source`` into ``target``, a slice of ``chunk``'s host payload,
        on the copy stream: no host sync.  The chunk is in flight until the copy lands (readers
        wait, as for a move).  Copies into one chunk land in issue order (one stream), so waiting
        for the last waits for all; earlier ones are polled with the rest."""
        previous = chunk.transfer
        if previous is not None and previous.route:
            raise IllegalTransition(f"{chunk.name} is moving ({previous.label}); wait for it before copying into it")
        if previous is not None:
            self._unfinished.append(previous)
        chunk.transfer = self.mover.copy(target, source, label)
        chunk.nvme_valid = False
        return chunk.transfer

    def payload_for_slot_copy(self, chunk: Chunk) -> torch.Tensor | None:
        """The host payload a device gradient may be copied into without waiting: the chunk is in
        host memory and has nothing in flight but earlier such copies; else None."""
        if (not self.accelerator.separate_memory or chunk.tier is not Tier.HOST or chunk.payload is None
                or (chunk.transfer is not None and chunk.transfer.route)):
            return None
        return chunk.payload

    def mark_dirty(self, chunk: Chunk) -> None:
        """The payload changed: its NVMe blob is stale."""
        chunk.nvme_valid = False

    @contextlib.contextmanager
    def spill_order(self, key: Callable[[Chunk], tuple]):
        previous, self.spill_preference = self.spill_preference, key
        try:
            yield
        finally:
            self.spill_preference = previous

    def ensure_host_room(self, nbytes: int, protect: Iterable[Chunk] = ()) -> None:
        """Spill host chunks to NVMe until ``nbytes`` more fit host_limit (no-op without NVMe)."""
        if self.host_limit is None:
            return
        protected = {c.id for c in protect}
        if self.bytes_on(Tier.HOST) + self.pool.cached_on(Tier.HOST) + nbytes > self.host_limit:
            self.pool.trim(Tier.HOST)  # free buffers count against the budget too
        while self.bytes_on(Tier.HOST) + nbytes > self.host_limit:
            self.poll()  # finished stores free their host bytes
            over = self.bytes_on(Tier.HOST) + nbytes - self.host_limit
            if over <= 0:
                return
            landing = self.stores_in_flight()
            deficit = over - sum(c.nbytes for c in landing)
            if deficit > 0:
                candidates = [c for c in self.chunks if self.can_spill(c) and c.id not in protected]
                if candidates:
                    victim = min(candidates, key=self.spill_preference or spill_key)
                    self.move(victim, Tier.NVME, cause="spill")
                    continue
            if landing:
                self.wait(landing[0])
                continue
            arriving = [c for c in self.chunks if c.transfer is not None and c.tier is Tier.HOST
                        and c.id not in protected]
            if arriving:  # reads into host memory: once landed they can be spilled again
                self.wait(arriving[0])
                continue
            raise HostBudgetError(self._host_budget_message(nbytes))

    def _host_budget_message(self, nbytes: int) -> str:
        held = [c for c in self.chunks if c.tier is Tier.HOST]
        return (f"host budget exhausted: {format_bytes(nbytes)} more chunk bytes are needed in host memory but "
                f"the {len(held)} chunks there ({format_bytes(self.bytes_on(Tier.HOST))} of host_budget="
                f"{format_bytes(self.host_limit)}) are all in use; raise host_budget")

    def payload_in_memory(self, chunk: Chunk) -> torch.Tensor:
        """The payload once any transfer has landed; a chunk on NVMe is read back to the host."""
        if chunk.tier is Tier.NVME:
            self.move(chunk, Tier.HOST, cause="fetch")
        self.wait(chunk)
        if chunk.tier is Tier.NVME:  # an optional read ahead failed (logged): read it, for real
            self.move(chunk, Tier.HOST, cause="fetch")
            self.wait(chunk)
        if chunk.payload is None:
            raise IllegalTransition(f"{chunk.name} has no payload (tier {chunk.tier})")
        return chunk.payload

    def release(self, chunk: Chunk) -> None:
        """Free a chunk's payload entirely (a GRAD chunk that in-slot gradients replaced)."""
        if chunk.tier is None:
            return
        if chunk.pins:
            raise IllegalTransition(f"{chunk.name} is in use and cannot be released")
        self.wait(chunk)
        chunk.nvme_valid = False
        if chunk.tier is Tier.NVME:  # its blob stays reserved; nothing in memory to free
            self._account(Tier.NVME, chunk, -1)
            chunk.tier = None
            return
        self._account(chunk.tier, chunk, -1)
        if chunk.payload is not None:
            if chunk.tier is Tier.DEVICE and chunk.kind is ChunkKind.PARAM:
                self._unbind(chunk)
                self.device_storages.pop(chunk.payload.untyped_storage().data_ptr(), None)
            self.pool.give(chunk.tier, chunk.payload)
        chunk.payload, chunk.tier = None, None

    def poll(self) -> None:
        """Process the transfers that have landed (cheap: a query each): the one place where
        completions run without a wait (source buffers released, bytes un-accounted).  Raises a
        failed one's error.  Queries (``Chunk.state``, ``Transfer.done``) change nothing."""
        self._unfinished = [t for t in self._unfinished if not t.poll()]
        for chunk in self.chunks:
            transfer = chunk.transfer
            if transfer is not None and transfer.poll() and transfer.route[:1] != (Tier.DEVICE,):
                # a finished eviction stays attached until waited (make_room counts it landing)
                chunk.transfer = None
                if transfer.error is not None:
                    raise transfer.error

    def stores_in_flight(self) -> list[Chunk]:
        """Chunks being stored from host memory to NVMe: their host bytes are freed as they land."""
        return [c for c in self.chunks if c.transfer is not None and c.transfer.route == (Tier.HOST, Tier.NVME)]

    def host_excess(self, nbytes: int) -> int:
        """Host chunk bytes past host_limit with ``nbytes`` more, once the stores in flight land."""
        landing = sum(c.nbytes for c in self.stores_in_flight())
        return self.bytes_on(Tier.HOST) - landing + nbytes - self.host_limit

    def spill_early(self, candidates: Iterable[Chunk], nbytes: int) -> int:
        """Start spilling ``candidates`` (spillable host chunks, in the order given) until at least
        ``nbytes`` are on their way to NVMe; waits for nothing.  Returns the bytes sent."""
        sent = 0
        for chunk in candidates:
            if sent >= nbytes:
                break
            self.move(chunk, Tier.NVME, cause="spill")
            sent += chunk.nbytes
        return sent

    @staticmethod
    def can_spill(chunk: Chunk) -> bool:
        """Whether a spill may take ``chunk`` now: in host memory, not pinned, not resident, nothing
        in flight."""
        return chunk.tier is Tier.HOST and chunk.pins == 0 and not chunk.resident and chunk.transfer is None

    def _evictions_in_flight(self) -> list[Chunk]:
        return [c for c in self.chunks if c.transfer is not None and c.transfer.route[:1] == (Tier.DEVICE,)]

    def wait(self, chunk: Chunk) -> float:
        """Block until the chunk's transfer (if any) is complete; seconds blocked.

        Raises the transfer's error; the chunk is then back where its bytes are."""
        transfer, chunk.transfer = chunk.transfer, None
        if transfer is None:
            return 0.0
        blocked = transfer.wait()
        self.blocked_s += blocked
        return blocked

    def ready_for_compute(self, chunk: Chunk) -> float:
        """Make a device chunk usable by the compute stream; bind its params' views."""
        if chunk.tier is not Tier.DEVICE:
            raise IllegalTransition(f"{chunk.name} is on {chunk.tier}, not the device")
        waited = 0.0
        transfer = chunk.transfer
        if transfer is not None:
            waited = transfer.wait_for_compute(self.accelerator)
            self.blocked_s += waited
            chunk.transfer = None
            if not transfer.poll():
                self._unfinished.append(transfer)
            elif transfer.error is not None:
                raise transfer.error
        if chunk.kind is ChunkKind.PARAM and not chunk.bound:
            self._bind(chunk)
        return waited

    # -- parameter views ---------------------------------------------------------------

    def placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        ph = self._placeholders.get(dtype)
        if ph is None:
            ph = self._placeholders[dtype] = torch.empty(0, dtype=dtype, device=self.device)
        return ph

    def _bind(self, chunk: Chunk) -> None:
        for slot in chunk.group.slots:
            if slot.state is not TensorState.GRAD_IN_SLOT:
                slot.param.data = chunk.view(slot)
        chunk.bound = True

    def _unbind(self, chunk: Chunk) -> None:
        ph = self.placeholder(chunk.dtype)
        for slot in chunk.group.slots:
            slot.param.data = ph
        chunk.bound = False

    def unbind_slot(self, chunk: Chunk, slot) -> None:
        """The slot stops holding weights (its gradient goes there)."""
        slot.param.data = self.placeholder(chunk.dtype)

    def rebind(self, chunk: Chunk) -> None:
        """After the slots hold weights again (optimizer step), refresh the views."""
        if chunk.tier is Tier.DEVICE and chunk.kind is ChunkKind.PARAM:
            self._bind(chunk)

    # -- pins and eviction -------------------------------------------------------------

    def pin(self, chunk: Chunk) -> None:
        chunk.pins += 1

    def unpin(self, chunk: Chunk) -> None:
        if chunk.pins <= 0:
            raise IllegalTransition(f"{chunk.name} unpinned more often than pinned")
        chunk.pins -= 1

    def evictable(self, protect: Iterable[Chunk] = ()) -> list[Chunk]:
        protected = {c.id for c in protect}
        return [c for c in self.chunks
                if c.tier is Tier.DEVICE and c.pins == 0 and not c.resident and c.id not in protected
                and c.state is not ChunkState.IN_FLIGHT]

    def evict(self, chunk: Chunk, reason: str) -> Transfer:
        dst = self.eviction_target(chunk)
        self.events.on_evict(chunk, Tier.DEVICE, dst, reason)
        logger.debug("evict %s -> %s: %s", chunk.name, dst.value, reason)
        transfer = self.move(chunk, dst, cause="evict")
        return transfer

    def make_room(self, nbytes: int, budget: int | Callable[[], int], policy: EvictionPolicy,
                  protect: Iterable[Chunk] = (), why: str = "") -> float:
        """Evict until ``nbytes`` more fit in ``budget`` device bytes; seconds blocked.

        ``budget`` may be a function (device budget minus the non-model bytes the allocator
        shows), asked once more before giving up: a chunk copied off the device holds its source
        buffer until the copy lands, counted among the non-model bytes when the budget was taken,
        so once every such copy has landed the budget may have grown.
        Raises DeviceBudgetError when what is left cannot be evicted.
        """
        protect = list(protect)
        room = budget() if callable(budget) else budget
        asked_again = not callable(budget)
        blocked = 0.0
        self.poll()
        while self.bytes_on(Tier.DEVICE) + nbytes > room:
            # an eviction still copying holds its device bytes: let it land before choosing more
            landing = self._evictions_in_flight()
            if landing:
                blocked += self.wait(landing[0])
                continue
            candidates = self.evictable(protect)
            if not candidates:
                # in-flight device chunks are not candidates: wait for them and try once more
                in_flight = [c for c in self.chunks if c.tier is Tier.DEVICE and c.transfer is not None
                             and c.pins == 0 and not c.resident and c not in protect]
                if in_flight:
                    for c in in_flight:
                        blocked += self.wait(c)
                    continue
                if not asked_again:  # every copy off the device has landed (waited above)
                    asked_again, room = True, budget()
                    continue
                raise DeviceBudgetError(self._budget_message(nbytes, room, why))
            victim, reason = policy.choose(candidates)
            transfer = self.evict(victim, reason + (f"; room for {why}" if why else ""))
            if not self.accelerator.separate_memory:
                blocked += transfer.wait()  # host "device": the source buffer is freed only once copied
        return blocked

    def _budget_message(self, nbytes: int, budget: int, why: str) -> str:
        held = [c for c in self.chunks if c.tier is Tier.DEVICE]
        held_bytes = sum(c.nbytes for c in held)
        extra = f" plus {format_bytes(nbytes)} to fetch" if nbytes else ""
        return (f"device budget exhausted ({why or 'fetch'}): {len(held)} chunk(s) in use on the device "
                f"({format_bytes(held_bytes)}){extra} do not fit the {format_bytes(max(0, budget))} left for "
                f"chunks; raise device_budget, or shrink the activations (smaller batch, activation "
                f"checkpointing), or lower chunk_size")

    # -- bulk operations ---------------------------------------------------------------

    def wait_all(self) -> float:
        blocked = sum(self.wait(c) for c in self.chunks if c.transfer is not None)
        for transfer in self._unfinished:
            blocked += transfer.wait()
        self._unfinished.clear()
        return blocked

    def close(self) -> None:
        try:
            self.wait_all()
        finally:
            self.mover.close()
            if self.nvme is not None:
                self.nvme.close()
        self.pool.clear()
        started = time.perf_counter()
        for chunk in self.chunks:
            chunk.payload = None
        logger.debug("chunk manager closed in %.3f s", time.perf_counter() - started)


class _Optional:
    """An NVMe request whose failure is logged and kept (``failed``), not raised: a write-back or
    a read ahead that may fail without consequence (``write_back``, ``move(optional=True)``)."""

    error = None  # never handed to the Transfer

    def __init__(self, request, name: str, what: str):
        self._request, self._name, self._what = request, name, what
        self.failed: BaseException | None = None

    def done(self) -> bool:
        return self._request.done()

    def wait(self) -> None:
        try:
            self._request.wait()
        except OSError as exc:
            if self.failed is None:
                self.failed = exc
                logger.warning("%s %s (optional) failed; nothing changed, it is retried when needed: %s",
                               self._what, self._name, exc)


def _failed_read_handler(request: _Optional, load_failed: Callable[[BaseException], None]):
    """The on_done of an optional read ahead: a read that failed (logged by ``request``) puts
    the chunk back on NVMe through ``load_failed``, as a failure that raised would."""
    def loaded(transfer: Transfer) -> None:
        if request.failed is not None:
            load_failed(request.failed)

    return loaded
