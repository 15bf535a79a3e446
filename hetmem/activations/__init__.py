"""Activation offload: saved activations to host memory and back along the traced schedule.

``policy.py`` chooses what to offload from the warm-up's trace, ``offloader.py`` moves saved
tensors and keeps the accounting, ``entries.py`` holds a saved tensor's states, ``transfer.py``
is the device-specific part (buffers and copies).  ``attach`` builds the offloader for an engine when ``activation_offload="auto"``.
"""
from __future__ import annotations

from hetmem.chunk_manager.manager import ChunkManager, HostBudgetError
from hetmem.chunk_manager.states import Tier

from .entries import ActivationStats, EntryState, SavedActivation, SavedEntry
from .offloader import ActivationOffloader
from .policy import OffloadPlan, SavedRecord, floor_with_offload, floor_without_offload, plan_offload
from .transfer import ActivationLink

__all__ = ["ActivationLink", "ActivationOffloader", "ActivationStats", "EntryState", "OffloadPlan",
           "SavedActivation", "SavedEntry", "SavedRecord", "attach", "floor_with_offload", "floor_without_offload",
           "plan_offload"]


def attach(mode: str, manager: ChunkManager, tracer, host_budget: int | None) -> ActivationOffloader | None:
    """The offloader for ``activation_offload=mode`` (None when "off"), wired to the tracer."""
    if mode == "off":
        return None
    link = ActivationLink(manager.mover, manager.accelerator)

    def host_room(nbytes: int) -> bool:
        """Activation host bytes count against host_budget (with NVMe, chunks spill to make room)."""
        if host_budget is None:
            return True
        wanted = offloader.host_bytes + nbytes
        if manager.nvme is not None:
            try:
                manager.ensure_host_room(wanted)
            except HostBudgetError:
                return False
            return True
        if manager.bytes_on(Tier.HOST) + wanted + link.cached_bytes() > host_budget:
            link.trim()
        return manager.bytes_on(Tier.HOST) + wanted <= host_budget

    def moment_index() -> int:
        current = tracer.clock.current
        return 0 if current is None else current.index

    offloader = ActivationOffloader(link, tracer.probe, moment_index=moment_index, host_room=host_room)
    offloader.on_mismatch = tracer.mark_stale
    return offloader
