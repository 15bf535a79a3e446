"""Where this process stands in a data-parallel job: rank, world size, process group, timeout.

Read from ``torch.distributed`` at ``hetmem.initialize``: ``DistContext.from_torch()`` is None
when the process group is not initialized or has one member, and the engine then runs exactly
as a single process.  hetmem never creates the process group itself (``torchrun`` plus
``torch.distributed.init_process_group`` in the user's script, or ``hetmem train --nproc``
through hetmem/distributed/launch.py); it only reads it.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger("hetmem.distributed")

# the process group's own default (torch.distributed.constants.default_pg_timeout) when it
# does not say: a dead peer is reported no later than this
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    rank: int                      # this process's rank in ``group``
    world_size: int                # ranks in ``group`` (> 1)
    group: object                  # the torch.distributed ProcessGroup the collectives run on
    backend: str                   # "gloo" | "nccl" | ... as torch names it
    timeout: datetime.timedelta    # how long a collective waits for a peer before it fails
    comm_device: torch.device      # where the backend's tensors must be: the host for gloo, else
                                   # the engine's compute device (NCCL: the rank's GPU)

    @classmethod
    def from_torch(cls, compute_device: torch.device, group=None) -> "DistContext | None":
        """The default (or given) process group, or None: not initialized, or world size 1."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = group or dist.group.WORLD
        world = dist.get_world_size(group)
        if world <= 1:
            return None
        backend = str(dist.get_backend(group))
        comm_device = torch.device("cpu") if backend == "gloo" else compute_device
        return cls(dist.get_rank(group), world, group, backend, _group_timeout(group), comm_device)

    def rank_folder(self, folder: str) -> str:
        """This rank's own subfolder of a folder every rank was given (e.g. ``nvme_dir``), so
        ranks on one machine never share swap files."""
        path = os.path.join(folder, f"rank-{self.rank:05d}")
        os.makedirs(path, exist_ok=True)
        return path

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size} ({self.backend})"


def _group_timeout(group) -> datetime.timedelta:
    """The timeout the process group was created with, where torch exposes it."""
    try:
        options = group._get_backend(torch.device("cpu")).options  # gloo
        return options._timeout
    except (AttributeError, RuntimeError):
        pass
    try:
        from torch.distributed.distributed_c10d import _get_default_timeout

        return _get_default_timeout(dist.get_backend(group))
    except (ImportError, TypeError, ValueError, AttributeError):
        return DEFAULT_TIMEOUT
