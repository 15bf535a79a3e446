"""A saved activation's states and what autograd keeps for it (see offloader.py)."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hetmem.chunk_manager.states import IllegalTransition
from hetmem.units import format_bytes

if TYPE_CHECKING:
    from .offloader import ActivationOffloader


class EntryState(enum.Enum):
    RESIDENT = "resident"      # the device copy is held; no host copy
    OFFLOADING = "offloading"  # device->host copy in flight; the device copy is still held
    RELEASING = "releasing"    # host copy complete; the device storage is still shared, so held
    HOST = "host"              # only the host copy exists
    RESTORING = "restoring"    # host->device copy in flight into a new device buffer


LEGAL = {
    EntryState.RESIDENT: {EntryState.OFFLOADING},
    EntryState.OFFLOADING: {EntryState.RELEASING, EntryState.RESIDENT},  # RESIDENT: used or aborted first
    EntryState.RELEASING: {EntryState.HOST, EntryState.RESIDENT},
    EntryState.HOST: {EntryState.RESTORING},
    EntryState.RESTORING: {EntryState.RESIDENT},
}


class SavedEntry:
    """One saved device storage; dies when autograd frees the last saved view of it."""

    __slots__ = ("seq", "nbytes", "ptr", "state", "device", "host", "transfer", "unpacked", "_owner",
                 "__weakref__")

    def __init__(self, seq: int, nbytes: int, ptr: int, device: object, owner: "ActivationOffloader"):
        self.seq = seq              # creation order in the micro-step: its record in the plan
        self.nbytes = nbytes
        self.ptr = ptr              # data_ptr of the saved device storage
        self.state = EntryState.RESIDENT
        self.device = device        # what the probe holds for the device copy (uint8, nbytes); None on HOST
        self.host: torch.Tensor | None = None  # host copy (uint8, nbytes) while one exists
        self.transfer = None        # the copy in flight (chunk_manager.mover.Transfer)
        self.unpacked = False       # backward used it: it stays on the device from then on
        self._owner = owner

    def set_state(self, new: EntryState) -> None:
        if new not in LEGAL[self.state]:
            raise IllegalTransition(f"saved activation {self.seq} ({format_bytes(self.nbytes)}): "
                                    f"{self.state.value} -> {new.value} is not a legal transition")
        self.state = new

    def __del__(self) -> None:
        self._owner._entry_died(self)


class SavedActivation:
    """What autograd keeps for a saved tensor: its entry and the view's geometry."""

    __slots__ = ("entry", "dtype", "offset", "size", "stride")

    def __init__(self, entry: SavedEntry, tensor: torch.Tensor):
        self.entry = entry
        self.dtype = tensor.dtype
        self.offset = tensor.storage_offset()
        self.size = tuple(tensor.size())
        self.stride = tuple(tensor.stride())


@dataclass
class ActivationStats:
    """Per step, for the report."""

    offloads: int = 0
    offloaded_bytes: int = 0
    restores: int = 0
    restored_bytes: int = 0
    late_restores: int = 0      # restored only when backward asked for them
    wait_s: float = 0.0         # compute blocked on activation copies
