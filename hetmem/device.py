"""The compute device and the byte budgets, resolved once from the config.

"auto" budgets are read off the machine: on an accelerator the device budget is its free
memory less a margin; on a CPU-only machine the "device" is host memory under an enforced
budget, and "auto" gives it half of the available memory.  The host budget "auto" is what is
available (less the device budget when both are host memory), keeping 10% back.
"""
from __future__ import annotations

from dataclasses import dataclass

import psutil

from hetmem.accelerator import Accelerator, resolve
from hetmem.config import AUTO, Config
from hetmem.units import format_bytes

@dataclass(frozen=True)
class Budgets:
    device: int          # the promise: chunk + non-model bytes on the device never above it
    margin: int          # part of it kept free for allocator slack
    host: int | None     # chunk bytes allowed in host memory; None: no limit set

    @property
    def usable(self) -> int:
        return self.device - self.margin


def resolve_device(config: Config) -> Accelerator:
    """The accelerator behind ``config.device`` (ValueError naming the fix when it is absent)."""
    return resolve(config.device)


def resolve_budgets(config: Config, accelerator: Accelerator) -> Budgets:
    available = psutil.virtual_memory().available
    device = accelerator.device
    if accelerator.separate_memory:
        free, _total = accelerator.free_memory()
        device_budget = free if config.device_budget == AUTO else config.device_budget
        if config.device_budget != AUTO and device_budget > free:
            raise ValueError(f"device_budget={format_bytes(device_budget)} is more than the "
                             f"{format_bytes(free)} free on {accelerator.name}; lower it or use 'auto'")
        margin = accelerator.margin(device_budget) if config.device_margin == AUTO else config.device_margin
    else:
        device_budget = available // 2 if config.device_budget == AUTO else config.device_budget
        if config.device_budget != AUTO and device_budget > available:
            raise ValueError(f"device_budget={format_bytes(device_budget)} is more than the "
                             f"{format_bytes(available)} of host memory available here, which is the compute "
                             f"device for device='cpu'; lower device_budget or use 'auto'")
        margin = 0 if config.device_margin == AUTO else config.device_margin
    if margin >= device_budget:
        raise ValueError(f"device_margin={format_bytes(margin)} leaves nothing of "
                         f"device_budget={format_bytes(device_budget)}; lower the margin or raise the budget")
    if config.host_budget == AUTO:
        host = available - (device_budget if device.type == "cpu" else 0)
        host = max(0, int(host * 0.9))
    else:
        host = config.host_budget
    return Budgets(device=int(device_budget), margin=int(margin), host=int(host))
