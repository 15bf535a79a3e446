"""Starting ranks: ``hetmem train --nproc N`` and the process group of a ``torchrun`` rank.

``launch_ranks(argv, nproc)`` re-runs the same command as N local ranks under PyTorch's own
launcher (``python -m torch.distributed.run --standalone``, torchrun's elastic agent: it picks a
free port, sets RANK / WORLD_SIZE / MASTER_* per rank, and stops the other ranks when one fails).
``init_from_env(device, timeout_s)`` is what a rank does first: initialize the default process
group from those variables (torch's default backend for the device: gloo on the CPU) when WORLD_SIZE > 1 and none exists.
That is also all a user's own script needs under torchrun (README "Data parallel").
"""
from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys

import torch
import torch.distributed as dist

from hetmem.accelerator.torch_device import available_device

logger = logging.getLogger("hetmem.distributed")


def world_size_from_env() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={value!r} is not a number; it is set by torchrun (or unset for one "
                         f"process)") from None


def device_type_for(device: str) -> str:
    """The torch device type a config's ``device`` trains on ("cpu" without an accelerator)."""
    if device == "auto":
        found = available_device()
        return "cpu" if found is None else found.type
    return device.partition(":")[0]


def backend_for(device: str) -> str:
    """torch's default backend for the device type (gloo on the CPU, NCCL on NVIDIA GPUs)."""
    return dist.Backend.default_device_backend_map.get(device_type_for(device), "gloo")


def init_from_env(device: str, timeout_s: float) -> bool:
    """Initialize the default process group from torchrun's variables; False for one process.
    On an accelerator each rank first takes the device of its LOCAL_RANK."""
    if world_size_from_env() <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = backend_for(device)
    kind = device_type_for(device)
    if kind != "cpu":
        torch.get_device_module(kind).set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("rank %d of %d: process group %s initialized", dist.get_rank(), dist.get_world_size(), backend)
    return True


def launch_ranks(argv: list[str], nproc: int) -> int:
    """Run ``python -m hetmem <argv>`` as ``nproc`` ranks on this machine; their exit code."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: give the number of ranks to run (>= 1)")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--module", "hetmem", *argv]
    logger.info("launching %d ranks: %s", nproc, " ".join(command))
    return subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
