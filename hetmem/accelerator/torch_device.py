"""A torch accelerator (CUDA, XPU, ...) through torch's device-generic API.

``torch.accelerator`` says which accelerator this machine has (torch >= 2.6; older torch is
asked through ``torch.cuda``), and ``torch.get_device_module(type)`` gives the streams, events,
allocator statistics and generators of that type, so another accelerator needs no change here.
"""
from __future__ import annotations

import torch

from .base import Accelerator, CopyEvent

# a caching allocator needs slack: the margin is this share of the budget, at least MIN_MARGIN
MARGIN_FRACTION = 0.05
MIN_MARGIN = 64 << 20
# device types hetmem accepts in Config.device besides "auto" and "cpu"
KNOWN_TYPES = ("cuda", "xpu")


def device_type_names() -> tuple[str, ...]:
    return KNOWN_TYPES


def available_device() -> torch.device | None:
    """The machine's current accelerator device, or None."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "current_accelerator"):
        if not acc.is_available():
            return None
        kind = acc.current_accelerator().type
        index_of = getattr(acc, "current_device_index", None) or getattr(acc, "current_device_idx")
        return torch.device(kind, index_of())
    if torch.cuda.is_available():  # torch < 2.6
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _module(kind: str):
    return torch.get_device_module(kind) if hasattr(torch, "get_device_module") else getattr(torch, kind)


def build_info() -> dict:
    """For the environment report: the toolkit torch was built with and the devices it sees."""
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda}"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip}"
    elif getattr(torch.version, "xpu", None):
        build = f"XPU {torch.version.xpu}"
    else:
        build = None
    device = available_device()
    info = {"build": build, "available": device is not None, "type": None if device is None else device.type,
            "devices": []}
    if device is not None:
        module = _module(device.type)
        info["devices"] = [module.get_device_name(i) for i in range(module.device_count())]
    return info


class TorchAccelerator(Accelerator):
    separate_memory = True

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.name = device.type
        self._module = _module(device.type)
        self.pin_host = True

    @classmethod
    def for_name(cls, wanted: str) -> "TorchAccelerator":
        """The accelerator for a device string like "cuda" or "cuda:1"; ValueError naming the fix."""
        device = torch.device(wanted)
        module = _module(device.type)
        if not module.is_available():
            raise ValueError(f"device={wanted!r} but {device.type.upper()} is not available here "
                             f"(torch {torch.__version__}, {build_info()['build'] or 'a CPU-only build'}); "
                             f"use device='cpu' or 'auto'")
        count = module.device_count()
        index = device.index if device.index is not None else module.current_device()
        if index >= count:
            raise ValueError(f"device={wanted!r} but only {count} {device.type} device(s) exist; "
                             f"use {device.type}:0..{device.type}:{count - 1}")
        return cls(torch.device(device.type, index))

    # -- copies ------------------------------------------------------------------------------

    def copy_stream(self):
        return self._module.Stream(self.device)

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream, label: str = "") -> CopyEvent:
        compute = self._module.current_stream(self.device)
        stream.wait_stream(compute)  # the source may still be written by queued kernels
        with self._module.stream(stream):
            dst.copy_(src, non_blocking=True)
            event = self._module.Event()
            event.record(stream)
        for t in (dst, src):
            if t.device.type == self.device.type:
                t.record_stream(stream)  # the allocator must not reuse it before the copy ends
        return event

    def compute_waits(self, event: CopyEvent) -> float:
        self._module.current_stream(self.device).wait_event(event)
        return 0.0

    def synchronize(self) -> None:
        self._module.synchronize(self.device)

    # -- memory ------------------------------------------------------------------------------

    def memory_allocated(self) -> int:
        return self._module.memory_allocated(self.device)

    def max_memory_allocated(self) -> int:
        return self._module.max_memory_allocated(self.device)

    def memory_reserved(self) -> int:
        return self._module.memory_reserved(self.device)

    def reset_peak_memory_stats(self) -> None:
        self._module.reset_peak_memory_stats(self.device)

    def margin(self, device_budget: int) -> int:
        return max(MIN_MARGIN, int(device_budget * MARGIN_FRACTION))

    def budget_for(self, need: int) -> int:
        return max(need + MIN_MARGIN, int(need / (1 - MARGIN_FRACTION)) + 1)

    def free_memory(self) -> tuple[int, int]:
        return self._module.mem_get_info(self.device)

    def device_count(self) -> int:
        return self._module.device_count()

    def set_memory_fraction(self, fraction: float) -> None:
        """Cap this process's share of the device (benchmarks check budgets against it)."""
        self._module.set_per_process_memory_fraction(fraction, self.device)

    def empty_cache(self) -> None:
        self._module.empty_cache()

    @property
    def out_of_memory(self) -> type[BaseException]:
        """The exception the allocator raises when the device is full."""
        return getattr(torch, "OutOfMemoryError", None) or self._module.OutOfMemoryError

    # -- random state ------------------------------------------------------------------------

    def rng_state(self) -> list[torch.Tensor]:
        return self._module.get_rng_state_all()

    def set_rng_state(self, state) -> None:
        if state is not None:
            self._module.set_rng_state_all(state)

    def describe(self) -> dict:
        return {"name": self.name, "device": str(self.device),
                "device_name": self._module.get_device_name(self.device)}
