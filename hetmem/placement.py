"""Keep everything on the device when it fits.

After a warm-up has measured the activations, if every chunk (parameters, master weights,
Adam states, gradients) plus the traced non-model peak plus the optimizer's temporaries fits
the device budget, all chunks move to the device once and stay there: no transfers in later
steps, and (on an accelerator) the optimizer runs on the device.  A later warm-up (new shapes, another
code path) releases them to the normal eviction policy first.
"""
from __future__ import annotations

import logging
from typing import Callable

from hetmem.accelerator import Accelerator
from hetmem.chunk_manager.chunk import Chunk
from hetmem.chunk_manager.manager import ChunkManager
from hetmem.chunk_manager.states import Tier
from hetmem.units import format_bytes

logger = logging.getLogger("hetmem.placement")


def optimizer_temporaries(manager: ChunkManager, accelerator: Accelerator) -> int:
    """Device bytes the on-device Adam allocates per chunk (an fp32 gradient and a denominator)."""
    if not accelerator.separate_memory:
        return 0  # the CPU kernel works in place
    return 2 * max(c.capacity for c in manager.chunks) * 4


def place_all_if_it_fits(manager: ChunkManager, accelerator: Accelerator, *, peak_non_model: int, usable: int,
                         bring_to_host: Callable[[Chunk], None]) -> bool:
    """Move every placed chunk to the device for good when they, the traced non-model peak and
    the optimizer's temporaries fit ``usable`` device bytes; ``bring_to_host`` reads a chunk back
    from NVMe first.  Returns whether it did."""
    placed = [c for c in manager.chunks if c.tier is not None]
    need = sum(c.nbytes for c in placed) + peak_non_model + optimizer_temporaries(manager, accelerator)
    if need > usable:
        return False
    for chunk in placed:
        if chunk.tier is not Tier.DEVICE:
            bring_to_host(chunk)
            manager.move(chunk, Tier.DEVICE, cause="fetch")
        chunk.resident = True
    manager.wait_all()
    for chunk in placed:
        manager.ready_for_compute(chunk)
    logger.info("everything fits the device budget (%s of %s): all %d chunks stay on the device",
                format_bytes(need), format_bytes(usable), len(placed))
    return True


def release_residency(manager: ChunkManager) -> None:
    """A new warm-up: chunks follow the eviction policy again.  The optimizer brings whatever a
    host-side update needs off the device (hetmem/optimizer.py ``_operands``)."""
    for chunk in manager.chunks:
        chunk.resident = False
