"""Saved activations moved to host memory in forward and back ahead of their use in backward.

The saved-tensor hooks (hetmem/hooks.py) hand every saved tensor that is not a view of a
parameter chunk to ``ActivationOffloader.pack``.  One ``SavedEntry`` stands for one device
storage (the saved views of it share the entry, so a storage is copied once); autograd keeps a
small ``SavedActivation`` (entry + view geometry) instead of the tensor.

When entries leave the device:
- following a plan (steady state, hetmem/activations/policy.py): the entries the plan chose
  start their device->host copy when they are saved; at the next moments the copy is found
  finished and, once nothing but autograd holds the storage, the device bytes are released;
  each comes back at its planned moment (one moment before backward first uses it), after
  that moment's chunks are placed, so the copy runs while the moment computes;
- with no plan yet (the warm-up) or off the plan: only when the scheduler would otherwise
  fail to make room (every unpinned chunk already evicted), the oldest saved activations —
  needed last by backward — go to host memory synchronously until the bytes fit, and come
  back when backward unpacks them.

Accounting: an entry's device bytes are held through the probe (``probe.hold_saved``) while it
has a device copy; released bytes are reported to ``probe.shift`` (after the release, and before
a restore's new hold, so the sum only ever dips) so the trace keeps the non-model peak the model
would have with nothing moved (the plan's input).  Host buffers count against ``host_budget``
through ``host_room``.
"""
from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import asdict
from typing import Callable

import torch

from hetmem.chunk_manager.buffers import sole_owner
from hetmem.chunk_manager.manager import DeviceBudgetError
from hetmem.units import format_bytes

from .entries import ActivationStats, EntryState, SavedActivation, SavedEntry
from .policy import (MIN_OFFLOAD_BYTES, OffloadPlan, SavedRecord, floor_with_offload, floor_without_offload,
                     plan_offload)
from .transfer import ActivationLink

logger = logging.getLogger("hetmem.activations")


class ActivationOffloader:
    def __init__(self, link: ActivationLink, probe, *, moment_index: Callable[[], int],
                 host_room: Callable[[int], bool]):
        self.link = link
        self.probe = probe                      # holds the device copies' bytes (tracer/probes.py)
        self.moment_index = moment_index        # the current moment's index
        self.host_room = host_room              # may nbytes more host memory hold activations?
        self.make_room: Callable[[int], None] = lambda nbytes: None  # the scheduler: room for a restore
        self.on_mismatch: Callable[[str], None] = lambda reason: None  # the tracer: schedule is stale
        self.observe: Callable[[], object] = lambda: None  # the scheduler: measure the device total now
        self._lock = threading.Lock()           # entries die on autograd's threads too
        # this micro-step
        self._by_storage: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # ptr -> entry
        self._order: list[weakref.ref] = []     # entries in pack order (the oldest go first)
        self._in_flight: list[SavedEntry] = []  # entries with a copy in flight
        self._releasing: list[SavedEntry] = []  # copied, waiting for the device storage to be theirs
        # host buffers of restores the compute stream waits for (accelerators): freed once landed
        self._landing: list[tuple[object, torch.Tensor, int]] = []  # (transfer, host buffer, nbytes)
        self._restore_due: dict[int, list[weakref.ref]] = {}  # moment -> entries it brings back
        self._seq = 0
        # the warm-up's view of the step, and the plan made from it
        self.records: list[SavedRecord] = []
        self.moment_chunks: dict[int, int] = {}  # moment -> chunk bytes pinned there (warm-up)
        self._recording = False
        self._unmarked: list[weakref.ref] = []  # warm-up entries whose free_from is not known yet
        self.plan: OffloadPlan | None = None
        self._following = False
        # plan for this usable device budget instead of the engine's (None: the engine's); the
        # benchmark sets it to measure the cost of offloading at a budget that would not need it
        # (chunks are then budgeted as without offload, so they move as they would without it)
        self.plan_usable: int | None = None
        # bytes now
        self.host_bytes = 0                     # host buffers holding activations
        self.away = 0                           # activation bytes released on the device now
        self.stats = ActivationStats()
        self._host_full_logged = False          # warned once that host_budget stopped an offload

    # -- micro-step boundaries -------------------------------------------------------------

    def begin_microstep(self, recording: bool) -> None:
        self._by_storage.clear()
        self._order = []
        self._restore_due = {}
        self._seq = 0
        self._recording = recording
        if recording:
            self.records, self.moment_chunks, self._unmarked = [], {}, []
        self._following = not recording and self.plan is not None and bool(self.plan.restore_at)

    def end_microstep(self, schedule, chunk_bytes: dict[int, int], usable: int) -> None:
        """After a recorded micro-step: plan the next ones (``schedule``: the store's records)."""
        if not self._recording:
            return
        self._recording = False
        chunks, non_model = self.moment_needs(schedule, chunk_bytes)
        self.plan = plan_offload(self.records, chunks, non_model,
                                 usable if self.plan_usable is None else self.plan_usable)
        for record, saving in zip(schedule, self.plan.saving):
            record.offloaded = saving if self.plan_usable is None else 0
        if self.plan.restore_at:
            logger.info("activation plan: %d of %d saved activations to host memory (%s at the fullest "
                        "moment)%s", len(self.plan.restore_at), len(self.records),
                        format_bytes(max(self.plan.saving)),
                        "" if self.plan.feasible else
                        f"; still {format_bytes(self.plan.deficit)} over the budget at some moment")

    def moment_needs(self, schedule, chunk_bytes: dict[int, int]) -> tuple[list[int], list[int]]:
        """Per moment: chunk bytes that must be on the device, non-model peak with nothing moved."""
        chunks = [max(sum(chunk_bytes[i] for i in r.working_set), self.moment_chunks.get(t, 0))
                  for t, r in enumerate(schedule)]
        return chunks, [r.non_model_peak for r in schedule]

    def floors(self, schedule, chunk_bytes: dict[int, int]) -> tuple[int, int]:
        """Smallest usable budgets for the recorded step: without offload, with it."""
        chunks, non_model = self.moment_needs(schedule, chunk_bytes)
        return floor_without_offload(chunks, non_model), floor_with_offload(self.records, chunks, non_model)

    def abort(self) -> None:
        """After a failed step: land every copy, keep what is on the device, drop the plan's step."""
        def landed(transfer) -> None:
            try:
                self.link.wait(transfer)
            except BaseException:  # noqa: BLE001 - the step failed already; the bytes are dropped
                logger.debug("activation copy failed during an abort", exc_info=True)

        for entry in self._in_flight + self._releasing:  # each still has its device copy
            if entry.transfer is not None:
                landed(entry.transfer)
            entry.transfer = None
            entry.set_state(EntryState.RESIDENT)
            self._drop_host(entry)
        for transfer, host, nbytes in self._landing:
            landed(transfer)
            self.link.give_back(host)
            with self._lock:
                self.host_bytes -= nbytes
        self._in_flight, self._releasing, self._landing = [], [], []
        self._recording = self._following = False
        self._restore_due = {}

    # -- saved tensors -----------------------------------------------------------------------

    def pack(self, tensor: torch.Tensor) -> SavedActivation | None:
        """For the pack hook; None: not an activation this offloader handles (keep it as before)."""
        if (tensor.device != self.link.device or tensor.layout is not torch.strided
                or type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.is_conj() or tensor.is_neg()):
            return None
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            return None
        nbytes = storage.nbytes()
        if nbytes < MIN_OFFLOAD_BYTES:
            return None
        entry = self._by_storage.get(storage.data_ptr())
        if entry is None or entry.nbytes != nbytes or entry.device is None:
            entry = self._new_entry(storage, nbytes)
        return SavedActivation(entry, tensor)

    def _new_entry(self, storage, nbytes: int) -> SavedEntry:
        base = torch.empty(0, dtype=torch.uint8, device=self.link.device).set_(storage)
        entry = SavedEntry(self._seq, nbytes, storage.data_ptr(), self.probe.hold_saved(base), self)
        self._seq += 1
        self._by_storage[entry.ptr] = entry
        self._order.append(weakref.ref(entry))
        now = self.moment_index()
        if self._recording:
            self.records.append(SavedRecord(nbytes, now))
            self._unmarked.append(weakref.ref(entry))
        elif self._following:
            seq = entry.seq
            if seq >= len(self.records) or self.records[seq].nbytes != nbytes:
                self._following = False
                self.on_mismatch(f"saved activation {seq} is {nbytes} B; the trace recorded "
                                 f"{self.records[seq].nbytes if seq < len(self.records) else 'none'}")
            elif seq in self.plan.restore_at and self._offload(entry):
                due = self.plan.restore_at[seq]
                if due is not None:
                    self._restore_due.setdefault(due, []).append(weakref.ref(entry))
        return entry

    def unpack(self, packed: SavedActivation) -> torch.Tensor:
        entry = packed.entry
        if self._recording and entry.seq < len(self.records) and self.records[entry.seq].used_at is None:
            self.records[entry.seq].used_at = self.moment_index()
        state = entry.state
        if state is EntryState.HOST:
            self.stats.late_restores += 1
            self._restore(entry)
            state = entry.state
        if state is EntryState.RESTORING:
            self._finish_restore(entry)
        elif state in (EntryState.OFFLOADING, EntryState.RELEASING):  # still on the device: keep it there
            self._keep_on_device(entry)
        entry.unpacked = True
        device = self.probe.unwrap(entry.device)
        return torch.empty(0, dtype=packed.dtype, device=device.device).set_(
            device.untyped_storage(), packed.offset, packed.size, packed.stride)

    # -- moments -----------------------------------------------------------------------------

    def on_moment(self, index: int) -> None:
        """A moment starts: finish landed copies, release what became ours."""
        for entry in list(self._in_flight):
            if entry.transfer is not None and entry.transfer.done():
                self._finish(entry)
        self._land()
        self._release_ready()
        if self._recording:
            self._mark_free(index)

    def on_moment_ready(self, index: int, pinned_chunk_bytes: Callable[[], int]) -> None:
        """The moment's chunks are placed: bring back what the plan wants here (warm-up: note the
        chunk bytes pinned, asked only then)."""
        if self._recording:
            self.moment_chunks[index] = max(self.moment_chunks.get(index, 0), pinned_chunk_bytes())
        for ref in self._restore_due.pop(index, ()):
            entry = ref()
            if entry is None or entry.state is not EntryState.HOST:
                continue
            try:
                self._restore(entry)
            except DeviceBudgetError as exc:  # it comes back when backward asks for it
                logger.debug("restore of saved activation %d deferred: %s", entry.seq, exc)

    def settle(self) -> float:
        """Land every offload in flight and release what it frees; seconds blocked."""
        self._land()
        blocked = 0.0
        for entry in [e for e in self._in_flight if e.state is EntryState.OFFLOADING]:
            blocked += self._finish(entry)
        self._release_ready()
        return blocked

    def relieve(self, nbytes: int) -> float:
        """Move the oldest saved activations to host memory until ``nbytes`` left the device."""
        freed, blocked = 0, 0.0
        for ref in self._order:
            if freed >= nbytes:
                break
            entry = ref()
            if (entry is None or entry.state is not EntryState.RESIDENT or entry.unpacked
                    or not sole_owner(self.probe.unwrap(entry.device))):
                continue
            if not self._offload(entry):
                break  # host_budget is full
            blocked += self._finish(entry)
            if entry.state is EntryState.HOST:
                freed += entry.nbytes
        if freed:
            logger.debug("moved %s of saved activations to host memory to make room", format_bytes(freed))
        return blocked

    def close(self) -> None:
        """The engine closes: free the cached host buffers."""
        self.link.trim()

    def take_stats(self) -> dict:
        stats, self.stats = self.stats, ActivationStats()
        return asdict(stats)

    # -- transitions -------------------------------------------------------------------------

    def _offload(self, entry: SavedEntry) -> bool:
        if not self.host_room(entry.nbytes):
            if not self._host_full_logged:
                self._host_full_logged = True
                logger.warning("host_budget is full: saved activations stay on the device (%s of them in "
                               "host memory now); raise host_budget to offload more", format_bytes(self.host_bytes))
            return False
        entry.host = self.link.host_buffer(entry.nbytes)
        with self._lock:
            self.host_bytes += entry.nbytes
        entry.transfer = self.link.copy(entry.host, self.probe.unwrap(entry.device),
                                        f"activation {entry.seq} device->host")
        entry.set_state(EntryState.OFFLOADING)
        self._in_flight.append(entry)
        self.stats.offloads += 1
        self.stats.offloaded_bytes += entry.nbytes
        return True

    def _restore(self, entry: SavedEntry) -> None:
        self.make_room(entry.nbytes)
        buffer = self.link.device_buffer(entry.nbytes)
        self._moved(-entry.nbytes)  # before the new hold: the natural count never spikes
        entry.device = self.probe.hold_saved(buffer)
        entry.ptr = buffer.untyped_storage().data_ptr()
        entry.transfer = self.link.copy(buffer, entry.host, f"activation {entry.seq} host->device")
        entry.set_state(EntryState.RESTORING)
        self._in_flight.append(entry)
        self.stats.restores += 1
        self.stats.restored_bytes += entry.nbytes
        self.observe()

    def _finish(self, entry: SavedEntry) -> float:
        """Wait for the entry's copy and move it on; seconds blocked."""
        if entry.state is EntryState.RESTORING:
            return self._finish_restore(entry)
        blocked = self.link.wait(entry.transfer)
        self.stats.wait_s += blocked
        entry.transfer = None
        self._in_flight.remove(entry)
        entry.set_state(EntryState.RELEASING)
        if not self._try_release(entry):
            self._releasing.append(entry)
        return blocked

    def _finish_restore(self, entry: SavedEntry) -> float:
        transfer, entry.transfer = entry.transfer, None
        blocked = self.link.wait_for_use(transfer)
        self.stats.wait_s += blocked
        self._in_flight.remove(entry)
        entry.set_state(EntryState.RESIDENT)
        if transfer.done():
            self._drop_host(entry)
        else:  # the copy still reads the host buffer: it returns once landed
            self._landing.append((transfer, entry.host, entry.nbytes))
            entry.host = None
        return blocked

    def _land(self) -> None:
        still = []
        for transfer, host, nbytes in self._landing:
            if transfer.done():
                self.link.give_back(host)
                with self._lock:
                    self.host_bytes -= nbytes
            else:
                still.append((transfer, host, nbytes))
        self._landing = still

    def _keep_on_device(self, entry: SavedEntry) -> None:
        """Used before its device copy was released: cancel the offload."""
        if entry.state is EntryState.OFFLOADING:
            self.stats.wait_s += self.link.wait(entry.transfer)
            entry.transfer = None
            self._in_flight.remove(entry)
        else:
            self._releasing.remove(entry)
        entry.set_state(EntryState.RESIDENT)
        self._drop_host(entry)

    def _try_release(self, entry: SavedEntry) -> bool:
        """Drop the device copy if nothing else holds its storage (else no byte would be freed)."""
        if not sole_owner(self.probe.unwrap(entry.device)):
            return False
        entry.device = None  # the probe's holder dies: the bytes leave the device count
        if self._by_storage.get(entry.ptr) is entry:  # the address may belong to a newer storage now
            del self._by_storage[entry.ptr]
        self._moved(entry.nbytes)
        entry.set_state(EntryState.HOST)
        return True

    def _release_ready(self) -> None:
        if self._releasing:
            self._releasing = [e for e in self._releasing if not self._try_release(e)]

    def _mark_free(self, index: int) -> None:
        """Warm-up: note the moment from which each saved storage is autograd's alone."""
        still = []
        for ref in self._unmarked:
            entry = ref()
            if entry is None or entry.unpacked:
                continue
            if entry.state is EntryState.HOST or (entry.device is not None
                                                  and sole_owner(self.probe.unwrap(entry.device))):
                self.records[entry.seq].free_from = index
            else:
                still.append(ref)
        self._unmarked = still

    def _moved(self, delta: int) -> None:
        with self._lock:
            self.away += delta
        self.probe.shift(delta)

    def _drop_host(self, entry: SavedEntry) -> None:
        host, entry.host = entry.host, None
        if host is not None:
            self.link.give_back(host)
            with self._lock:
                self.host_bytes -= entry.nbytes

    def _entry_died(self, entry: SavedEntry) -> None:
        """Autograd freed the last view (also of an entry still in host memory)."""
        if entry.state is EntryState.HOST:
            self._moved(-entry.nbytes)
        self._drop_host(entry)
