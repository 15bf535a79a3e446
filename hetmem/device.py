"""The compute device and the byte budgets, resolved once from the config.

"auto" budgets are read off the machine: on CUDA the device budget is the free memory less a
margin; on a CPU-only machine the "device" is host memory under an enforced budget, and
"auto" gives it half of the available memory.  The host budget "auto" is what is available
(less the device budget when both are host memory), keeping 10% back.
"""
from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from hetmem.config import AUTO, Config
from hetmem.units import format_bytes

CUDA_MARGIN_FRACTION = 0.05
CUDA_MIN_MARGIN = 64 << 20


@dataclass(frozen=True)
class Budgets:
    device: int          # the promise: chunk + non-model bytes on the device never above it
    margin: int          # part of it kept free for allocator slack
    host: int | None     # chunk bytes allowed in host memory; None: no limit set

    @property
    def usable(self) -> int:
        return self.device - self.margin


def resolve_device(config: Config) -> torch.device:
    wanted = config.device
    if wanted == AUTO:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if wanted.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={wanted!r} but CUDA is not available here "
                             f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                             f"use device='cpu' or 'auto'")
        device = torch.device(wanted)
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device={wanted!r} but only {torch.cuda.device_count()} CUDA device(s) exist; "
                             f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    return torch.device("cpu")


def resolve_budgets(config: Config, device: torch.device) -> Budgets:
    available = psutil.virtual_memory().available
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        device_budget = free if config.device_budget == AUTO else config.device_budget
        if config.device_budget != AUTO and device_budget > free:
            raise ValueError(f"device_budget={format_bytes(device_budget)} is more than the "
                             f"{format_bytes(free)} free on {device}; lower it or use 'auto'")
        margin = (max(CUDA_MIN_MARGIN, int(device_budget * CUDA_MARGIN_FRACTION))
                  if config.device_margin == AUTO else config.device_margin)
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
