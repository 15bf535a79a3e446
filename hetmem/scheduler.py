"""At each moment: which chunks must be on the device, what to evict, what to prefetch.

Called by the module hooks (pre/post forward, pre backward), the saved-tensor hooks (a saved
tensor is new non-model memory; an unpacked one may need its chunk back) and the engine
(micro-step boundaries).  It keeps the promise: chunk bytes on the device plus the measured
non-model bytes stay within ``device_budget - margin`` at every moment and at every saved
tensor, evicting what is not pinned (Belady from the traced schedule, LRU during warm-up) and
raising ``DeviceBudgetError`` when what is pinned cannot fit.
"""
from __future__ import annotations

import gc
import logging
import math
from typing import Callable, Iterable

import torch
from torch import nn

from hetmem.chunk_manager.chunk import Chunk, ParamSlot
from hetmem.chunk_manager.eviction import EvictionPolicy
from hetmem.chunk_manager.manager import ChunkManager, DeviceBudgetError, HostBudgetError
from hetmem.chunk_manager.states import ChunkKind, IllegalTransition, TensorState, Tier
from hetmem.layout import Layout
from hetmem.lifecycle import Lifecycle, Phase
from hetmem.tracer.clock import MomentKind
from hetmem.tracer.tracer import MemoryTracer
from hetmem.units import format_bytes

logger = logging.getLogger("hetmem.scheduler")

NVME_LOOKAHEAD = 4  # moments ahead whose NVMe-resident chunks are read into host memory early
READ_AHEAD_SHARE = 0.75  # read ahead only while host memory is below this share of host_budget


class Scheduler:
    def __init__(self, manager: ChunkManager, tracer: MemoryTracer, layout: Layout, *,
                 prefetch: bool, recorder=None, lifecycle: Lifecycle | None = None, activations=None):
        self.manager = manager
        self.tracer = tracer
        self.layout = layout
        self.policy = EvictionPolicy(self._next_use)
        self.prefetch_enabled = prefetch
        self.recorder = recorder                    # the report's recorder, or None
        self.lifecycle = lifecycle or Lifecycle()   # the engine's: where the step is (read only here)
        # saved activations to host memory and back (hetmem/activations), or None when off
        self.activations = activations
        if activations is not None:
            activations.make_room = self.room_for_activation
            activations.observe = self.observe
        self._chunks_by_id = {c.id: c for c in manager.chunks}
        self._module_chunks: dict[nn.Module, list[Chunk]] = {}
        # modules inside their forward, innermost last: (module, its chunks, its slots)
        self._forward_stack: list[tuple[nn.Module, list[Chunk], list[ParamSlot]]] = []
        # pinned from a backward moment (or a late fetch) until the next moment
        self._moment_chunks: list[Chunk] = []
        self._moment_slots: list[ParamSlot] = []
        self._chunk_bytes_min = 0                   # fewest device chunk bytes since the last moment
        self.wait_s = 0.0                           # compute blocked on transfers, this micro-step
        self.late_fetches = 0                       # chunks fetched outside a moment (schedule miss)
        # the promise, measured: the largest simultaneous chunk + non-model device bytes seen
        # (since initialize, and since the current moment began)
        self.peak_total = 0
        self.interval_peak_total = 0
        self.last_chunk_budget: int | None = None   # the chunk budget the last moment was placed with
        # the optimizer step overlapped with the next forward (hetmem/step_pipeline.py): applied to
        # chunks' groups before they are placed (waiting for it), before they are prefetched as far
        # as it can without waiting (the chunks it could not reach are not prefetched); at each backward
        # moment the coming step's optimizer state read ahead.  No-ops until the engine sets them.
        self.apply_step: Callable[[Iterable[Chunk]], None] = lambda chunks: None
        self.ready_for_prefetch: Callable[[list[Chunk]], list[Chunk]] = lambda chunks: chunks
        self.read_state_early: Callable[[], None] = lambda: None
        # data parallel with shard_params (hetmem/distributed/gather.py): gathers the PARAM chunks of
        # groups other ranks own before use and drops them after; None otherwise
        self.gather = None

    # -- helpers -----------------------------------------------------------------------

    def _next_use(self, chunk_id: int) -> float | None:
        return self.tracer.next_use(chunk_id)

    def module_name(self, module: nn.Module) -> str:
        return self.layout.module_names.get(module, type(module).__name__)

    def module_chunks(self, module: nn.Module) -> list[Chunk]:
        chunks = self._module_chunks.get(module)
        if chunks is None:
            chunks = []
            for slot in self.layout.module_slots.get(module, ()):
                chunk = slot.group.chunks[ChunkKind.PARAM]
                if chunk not in chunks:
                    chunks.append(chunk)
            self._module_chunks[module] = chunks
        return chunks

    def device_bytes(self) -> int:
        return self.manager.bytes_on(Tier.DEVICE)

    def non_model_now(self) -> int:
        return self.tracer.probe.current(self.device_bytes())

    def chunk_budget(self, extra: int = 0) -> int:
        """Device bytes chunks may use now (``extra``: non-model bytes about to arrive)."""
        return self.tracer.budget.chunk_budget(self.tracer.current_record(), self.non_model_now() + extra)

    def observe(self) -> int:
        """Record the current chunk + non-model device bytes in the peaks; returns it."""
        total = self.device_bytes() + self.non_model_now()
        if total > self.interval_peak_total:
            self.interval_peak_total = total
            if total > self.peak_total:
                self.peak_total = total
        return total

    # -- micro-step boundaries ---------------------------------------------------------

    def begin_microstep(self) -> None:
        self.tracer.begin_microstep()
        if self.activations is not None:
            self.activations.begin_microstep(self.tracer.recording)
        self.wait_s = 0.0
        self._chunk_bytes_min = self.device_bytes()
        if self.gather is not None:
            self.gather.begin()

    @property
    def traced(self) -> bool:
        """Inside a recorded micro-step (the engine's lifecycle is FORWARD or BACKWARD)."""
        return self.lifecycle.traced

    @property
    def phase(self) -> str:
        """"forward" | "backward" | "optimizer" | "idle", from the engine's lifecycle."""
        state = self.lifecycle.state
        return state.value if state in (Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER) else "idle"

    def _drop_forward_stack(self) -> None:
        """Release modules whose forward never reported its end.

        Non-reentrant activation checkpointing stops a recomputation early by raising inside
        the forward once it has the tensors it needs, so the post-forward hooks of the
        modules still running never fire.  A backward moment cannot happen inside a forward,
        so whatever is on the stack then (or at the end of a micro-step) is such a leftover.
        """
        while self._forward_stack:
            _, chunks, slots = self._forward_stack.pop()
            self._release(chunks, slots, TensorState.HOLD)

    def end_microstep(self) -> None:
        self._drop_forward_stack()
        self._release_moment()
        if self.gather is not None:
            self.gather.end()
        if self.traced:
            self.tracer.end_microstep(self._chunk_bytes_min)
            self._close_recorded_interval()
            if self.activations is not None:  # after a warm-up: plan from the new schedule
                self.activations.end_microstep(self.tracer.store.schedule or [],
                                               {i: c.nbytes for i, c in self._chunks_by_id.items()},
                                               self.tracer.budget.usable)

    def abort(self) -> None:
        """After an exception mid-step: drop every pin so the engine stays usable."""
        for _, chunks, slots in reversed(self._forward_stack):
            self._release(chunks, slots, TensorState.HOLD)
        self._forward_stack.clear()
        self._release_moment()
        for chunk in self.manager.chunks:
            chunk.pins = 0
        for slot in self.layout.slots:
            slot.compute_users = 0
            if slot.state is TensorState.COMPUTE:
                slot.set_state(TensorState.HOLD)
        if self.tracer.recording:
            self.tracer.abandon()
        if self.activations is not None:
            self.activations.abort()
        if self.gather is not None:
            self.gather.abort()
        # the failed step's graph is garbage now (an exception's traceback cycles keep it until
        # the collector runs): free it, and forget what the probe counted of it
        gc.collect()
        self.tracer.probe.forget()

    # -- moments -----------------------------------------------------------------------

    def _moment(self, kind: MomentKind, module: nn.Module):
        """Start a moment; returns it (None outside a recorded micro-step)."""
        self._release_moment()
        moment = None
        if self.traced:
            moment = self.tracer.tick(kind, self.module_name(module), self._chunk_bytes_min)
            self._close_recorded_interval()
        if self.gather is not None:
            self.gather.on_moment(kind, self.module_name(module), None if moment is None else moment.index)
        self.manager.poll()
        if self.activations is not None and moment is not None:
            self.activations.on_moment(moment.index)
        self._chunk_bytes_min = self.device_bytes()
        self.manager.clock += 1
        return moment

    def _close_recorded_interval(self) -> None:
        if self.recorder is not None:
            self.recorder.close_interval(self.interval_peak_total)
        self.interval_peak_total = 0
        self.observe()

    def _moment_ready(self, moment) -> None:
        """The moment's chunks are in place: bring back the activations due, record it."""
        if self.activations is not None and moment is not None:
            self.activations.on_moment_ready(moment.index, self._pinned_bytes)
        self.observe()
        if moment is not None and self.recorder is not None:
            self.recorder.on_moment(moment, self)

    def pre_forward(self, module: nn.Module) -> None:
        self.apply_step(self.module_chunks(module))
        slots = self.layout.module_slots.get(module, [])
        for slot in slots:
            if slot.state is TensorState.GRAD_IN_SLOT and self.phase != "backward":
                raise IllegalTransition(
                    f"parameter {slot.name!r} holds its gradient until engine.step(): a forward between "
                    f"engine.backward() and engine.step() cannot use its weights; call engine.step() "
                    f"first, or use gradient_accumulation_steps > 1 for several forwards per step")
        moment = self._moment(MomentKind.PRE_FORWARD, module)
        chunks = self.module_chunks(module)
        self._acquire(chunks, why=f"forward of {self.module_name(module)!r}")
        for slot in slots:
            self._use_weights(slot)
        self._forward_stack.append((module, chunks, slots))
        self._prefetch()
        self._moment_ready(moment)

    def post_forward(self, module: nn.Module) -> None:
        for i in range(len(self._forward_stack) - 1, -1, -1):
            if self._forward_stack[i][0] is module:
                _, chunks, slots = self._forward_stack.pop(i)
                break
        else:
            return  # its pre-forward ran before an abort
        after = TensorState.HOLD_AFTER_FWD if (self.traced and torch.is_grad_enabled()) else TensorState.HOLD
        self._release(chunks, slots, after)

    def pre_backward(self, module: nn.Module) -> None:
        self._drop_forward_stack()
        moment = self._moment(MomentKind.PRE_BACKWARD, module)
        chunks = self.module_chunks(module)
        self._acquire(chunks, why=f"backward of {self.module_name(module)!r}")
        self._moment_chunks.extend(chunks)
        for slot in self.layout.module_slots.get(module, []):
            if slot.state not in (TensorState.GRAD_IN_SLOT, TensorState.HOLD_AFTER_BWD):
                self._use_weights(slot)
                self._moment_slots.append(slot)
        self._prefetch()
        self.read_state_early()  # after this moment's own reads
        self._moment_ready(moment)

    def _release_moment(self) -> None:
        chunks, self._moment_chunks = self._moment_chunks, []
        slots, self._moment_slots = self._moment_slots, []
        self._release(chunks, slots, TensorState.HOLD)

    # -- pins and fetches --------------------------------------------------------------

    def _use_weights(self, slot: ParamSlot) -> None:
        slot.compute_users += 1
        slot.set_state(TensorState.COMPUTE)

    def _release(self, chunks: list[Chunk], slots: list[ParamSlot], after: TensorState) -> None:
        for slot in slots:
            slot.compute_users -= 1
            if slot.compute_users <= 0:
                slot.compute_users = 0
                if slot.state is TensorState.COMPUTE:
                    slot.set_state(after)
        for chunk in chunks:
            self.manager.unpin(chunk)
        if self.gather is not None:
            self.gather.release(chunks)

    def _acquire(self, chunks: list[Chunk], why: str) -> None:
        """Make ``chunks`` resident and usable on the device, and pin them."""
        self.apply_step(chunks)
        if self.gather is not None:  # other ranks' groups: broadcast from their owners (waited here)
            self.gather.acquire(chunks)
        clock = self.manager.clock
        for chunk in chunks:
            chunk.last_use = clock
            self.tracer.note_access(chunk.id)
        missing = [c for c in chunks if c.tier is not Tier.DEVICE]
        # Room for the missing chunks within this interval's chunk budget; evicting here (even
        # when nothing is missing) keeps the interval's activations from having to evict.
        need = sum(c.nbytes for c in missing)
        self.last_chunk_budget = self._make_room(need, chunks, why)
        for chunk in missing:
            self.bring_to_host(chunk)
            self.manager.move(chunk, Tier.DEVICE, cause="fetch")
        for chunk in chunks:
            self.wait_s += self.manager.ready_for_compute(chunk)
            self.manager.pin(chunk)
        self._chunk_bytes_min = min(self._chunk_bytes_min, self.device_bytes())

    def bring_to_host(self, chunk: Chunk) -> None:
        """NVMe -> host for a chunk about to be used (the NVMe tier overrides the move)."""
        if chunk.tier is Tier.NVME:
            self.manager.move(chunk, Tier.HOST, cause="fetch")

    def late_fetch(self, chunk: Chunk) -> None:
        """A chunk needed between moments (a saved tensor unpacked off schedule)."""
        if chunk.tier is not Tier.DEVICE:
            self.late_fetches += 1
            logger.debug("late fetch of %s", chunk.name)
        self._acquire([chunk], why=f"unpacking a saved view of {chunk.name}")
        self._moment_chunks.append(chunk)
        self.observe()

    # -- non-model memory --------------------------------------------------------------

    def on_non_model_growth(self) -> None:
        """A saved tensor or output arrived: evict unpinned chunks if the total went over."""
        if self.device_bytes() > self.chunk_budget():
            self._make_room(0, (), "a saved tensor")
            self._chunk_bytes_min = min(self._chunk_bytes_min, self.device_bytes())
        self.observe()

    def room_for_activation(self, nbytes: int) -> None:
        """Room for ``nbytes`` of saved activations coming back from host memory."""
        if self.device_bytes() > self.chunk_budget(nbytes):
            self._make_room(0, (), f"{format_bytes(nbytes)} of activations coming back", extra=nbytes)
            self._chunk_bytes_min = min(self._chunk_bytes_min, self.device_bytes())

    def _make_room(self, need: int, protect, why: str, extra: int = 0) -> int:
        """Evict until ``need`` more chunk bytes fit this interval's chunk budget (with ``extra``
        non-model bytes about to arrive); returns that budget.  Activations being offloaded land
        first; saved activations go to host memory only when evicting every unpinned chunk could
        not make room (hetmem/activations)."""
        budget = self.chunk_budget(extra)
        if self.device_bytes() + need <= budget:
            return budget
        if self.activations is not None:
            self.wait_s += self.activations.settle()
            budget = self.chunk_budget(extra)
            short = self._held_bytes(protect) + need - budget
            if short > 0:
                self.wait_s += self.activations.relieve(short)
                budget = self.chunk_budget(extra)
        if self.device_bytes() + need > budget:
            # asked again before giving up, once every copy off the device has landed: until then
            # their source buffers count among the non-model bytes (not after evicting here: the
            # probe keeps the highest reading as this moment's peak)
            self.wait_s += self.manager.make_room(
                need, lambda: self.chunk_budget(extra), self.policy, protect=protect,
                why=f"{why}; activations {format_bytes(self.non_model_now())}")
        return budget

    def _held_bytes(self, protect) -> int:
        """Device chunk bytes no eviction can free now: pinned, resident or protected chunks
        (the rest, transfers still landing included, make_room can reclaim)."""
        protected = {c.id for c in protect}
        return sum(c.nbytes for c in self.manager.chunks
                   if c.tier is Tier.DEVICE and (c.pins or c.resident or c.id in protected))

    def _pinned_bytes(self) -> int:
        return sum(c.nbytes for c in self.manager.chunks if c.pins and c.tier is Tier.DEVICE)

    # -- prefetch ----------------------------------------------------------------------

    def _prefetch(self) -> None:
        """Start the next moments' transfers; opportunistic: a prefetch that does not fit is skipped."""
        if self.gather is not None:  # issued whatever the budget: every rank issues the same
            self.gather.prefetch()
        if not self.prefetch_enabled:
            return
        try:
            self._prefetch_inner()
        except (HostBudgetError, DeviceBudgetError) as exc:
            logger.debug("prefetch stopped: %s", exc)

    def _prefetch_inner(self) -> None:
        self._read_ahead_from_nvme()
        upcoming = self.tracer.upcoming_record()
        if upcoming is None:
            return
        budget = self.tracer.budget.prefetch_budget(self.tracer.current_record(), upcoming,
                                                    self.non_model_now())
        wanted = sorted((self._chunks_by_id[i] for i in upcoming.working_set), key=lambda c: c.id)
        # (not a chunk being gathered, pinned until it lands, nor one this rank does not hold)
        movable = [c for c in wanted if c.tier is not Tier.DEVICE and c.tier is not None and not c.pins]
        for chunk in self.ready_for_prefetch(movable):
            if not self._room_for_prefetch(chunk, budget, protect=wanted):
                break
            self.bring_to_host(chunk)
            self.manager.move(chunk, Tier.DEVICE, cause="prefetch")

    def _read_ahead_from_nvme(self) -> None:
        """Start reading, into host memory, the NVMe chunks of the moments after the next one
        (the next one's go on to the device in _prefetch): the disk works while compute runs."""
        if self.manager.nvme is None or self.tracer.clock.current is None:
            return
        now = self.tracer.clock.current.index
        manager = self.manager
        for ahead in range(2, NVME_LOOKAHEAD + 1):
            record = self.tracer.store.expected(now + ahead) if self.tracer.current_record() else None
            if record is None:
                return
            for chunk_id in sorted(record.working_set):
                chunk = self._chunks_by_id[chunk_id]
                if chunk.tier is Tier.NVME and chunk.transfer is None:
                    if manager.bytes_on(Tier.HOST) + chunk.nbytes > manager.host_limit * READ_AHEAD_SHARE:
                        return  # keep room for the optimizer's pipeline and the fetches that block
                    manager.move(chunk, Tier.HOST, cause="prefetch")

    def _room_for_prefetch(self, chunk: Chunk, budget: int, protect: list[Chunk]) -> bool:
        """Evict only chunks needed later than ``chunk``; never stall for a prefetch."""
        mine = self.tracer.next_use(chunk.id)
        mine = math.inf if mine is None else mine
        while self.device_bytes() + chunk.nbytes > budget:
            candidates = [c for c in self.manager.evictable(protect)
                          if (self.tracer.next_use(c.id) or 0) > mine]
            if not candidates:
                return False
            victim, reason = self.policy.choose(candidates)
            transfer = self.manager.evict(victim, reason + f"; room to prefetch {chunk.name}")
            if not self.manager.accelerator.separate_memory:
                transfer.wait()
        return True

