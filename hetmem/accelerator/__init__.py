"""The accelerator seam: the one place that knows which kind of device computes.

Everything device-specific that hetmem needs is a question to an ``Accelerator``: where
tensors of the compute device live, whether that device has memory of its own (then copies
to and from it are asynchronous and host buffers are pinned), side streams and events for
those copies, allocator statistics and free memory, the device count, and the RNG state.
The algorithms (chunk manager, scheduler, optimizer, tracer) ask it and never name a device
type.  Backends:

- ``HostAccelerator`` (host.py): no accelerator; the "device" is host memory under an
  accounted budget and copies run on one worker thread.
- ``TorchAccelerator`` (torch_device.py): any torch accelerator (CUDA, XPU, ...) through
  torch's device-generic API (``torch.accelerator``, ``torch.get_device_module``).
- ``SimAccelerator`` (sim.py): a simulated asynchronous device for tests, backed by host
  memory, whose copies land late on their own thread and which checks the copy protocol.

Tests select the simulated device with the environment variable ``HETMEM_DEVICE=sim``: the
configured devices "auto" and "cpu" then resolve to it (see ``resolve``).
"""
from __future__ import annotations

import os

from .base import Accelerator, CopyEvent
from .host import HostAccelerator

SIM_ENV = "HETMEM_DEVICE"   # "sim": tests run on the simulated device

__all__ = ["Accelerator", "CopyEvent", "HostAccelerator", "resolve", "default_accelerator", "host_pinning",
           "SIM_ENV", "validate_device_name"]

_HOST = HostAccelerator()


def validate_device_name(name: object) -> str | None:
    """None when ``name`` is a device setting hetmem accepts, else the fix to suggest."""
    from .torch_device import device_type_names

    types = device_type_names()
    if isinstance(name, str):
        if name in ("auto", "cpu") or name in types:
            return None
        kind, _, index = name.partition(":")
        if kind in types and index.isdigit():
            return None
    first, *others = types
    more = ", ".join(f"'{t}', '{t}:N'" for t in others)
    return f"use 'auto', 'cpu', '{first}' or '{first}:N'" + (f" (other accelerators: {more})" if more else "")


def resolve(wanted: str) -> Accelerator:
    """The accelerator for the config's ``device`` ("auto", "cpu", or a torch device string)."""
    if wanted in ("auto", "cpu") and os.environ.get(SIM_ENV, "") == "sim":
        from .sim import SimAccelerator

        return SimAccelerator()  # one per engine, as if each had a GPU of its own
    if wanted == "cpu":
        return _HOST
    from .torch_device import TorchAccelerator, available_device

    if wanted == "auto":
        device = available_device()
        return _HOST if device is None else TorchAccelerator(device)
    return TorchAccelerator.for_name(wanted)


def default_accelerator() -> Accelerator:
    """What "auto" resolves to on this machine (the simulated device under HETMEM_DEVICE=sim)."""
    return resolve("auto")


def host_pinning() -> bool:
    """Whether host buffers meant for device copies should be page-locked on this machine."""
    from .torch_device import available_device

    return available_device() is not None
