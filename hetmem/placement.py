"""Keep everything on the device when it fits.

After a warm-up has measured the activations, if every chunk (parameters, master weights,
Adam states, gradients) plus the traced non-model peak plus the optimizer's temporaries fits
the device budget, all chunks move to the device once and stay there: no transfers in later
steps, and (on an accelerator) the optimizer runs on the device.  A later warm-up (new shapes, another
code path) releases them to the normal eviction policy first.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from hetmem.chunk_manager.states import Tier
from hetmem.units import format_bytes

if TYPE_CHECKING:
    from hetmem.engine import Engine

logger = logging.getLogger("hetmem.placement")


def optimizer_temporaries(engine: "Engine") -> int:
    """Device bytes the on-device Adam allocates per chunk (an fp32 gradient and a denominator)."""
    if not engine.accelerator.separate_memory:
        return 0  # the CPU kernel works in place
    return 2 * max(c.capacity for c in engine.manager.chunks) * 4


def place_all_if_it_fits(engine: "Engine") -> bool:
    manager = engine.manager
    placed = [c for c in manager.chunks if c.tier is not None]
    need = sum(c.nbytes for c in placed) + engine.tracer.store.peak_non_model + optimizer_temporaries(engine)
    if need > engine.budgets.usable:
        return False
    for chunk in placed:
        if chunk.tier is not Tier.DEVICE:
            engine.scheduler.bring_to_host(chunk)
            manager.move(chunk, Tier.DEVICE, cause="fetch")
        chunk.resident = True
    manager.wait_all()
    for chunk in placed:
        manager.ready_for_compute(chunk)
    logger.info("everything fits the device budget (%s of %s): all %d chunks stay on the device",
                format_bytes(need), format_bytes(engine.budgets.usable), len(placed))
    return True


def release_residency(engine: "Engine") -> None:
    for chunk in engine.manager.chunks:
        chunk.resident = False
