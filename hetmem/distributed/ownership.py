"""Which rank owns which chunk group, and the check that every rank built the same layout.

Design (PatrickStar-style ownership, not Gemini-style sharding of every chunk): each trainable
chunk group is owned, whole, by one rank.  Only its owner creates its MASTER / EXP_AVG /
EXP_AVG_SQ chunks and runs the CPU Adam on it; at each accumulation boundary the group's
gradient chunk is reduced to the owner, and the updated PARAM chunk is broadcast from it.
Why whole groups: a chunk group is already hetmem's unit of placement, NVMe IO, the optimizer
pipeline and the checkpoint; owning whole groups keeps every one of those paths unchanged on a
rank (a rank is a single-process engine over fewer groups), where slicing every chunk into N
shards (Gemini) would change the chunk size every part sees and put N-way collectives on
chunks 1/N the size.  The cost: balance is per group, so optimizer state per rank is 1/N of
the total within one group's bytes (``assign_owners`` guarantees it), and the job needs at
least N trainable groups.

Owners are chosen by bytes, largest group first, to the least-loaded rank (ties: lower
index, lower rank): a pure function of the layout, so identical on every rank without
communication once the layouts are (``check_same_layout``).
"""
from __future__ import annotations

import hashlib
import json
import logging

import torch

from hetmem.layout import Layout

from .comm import Comm

logger = logging.getLogger("hetmem.distributed")

# config keys that change what a step computes: they must be equal on every rank
SHARED_KEYS = ("dtype", "optimizer", "gradient_clipping", "gradient_accumulation_steps", "loss_scale", "chunk_size",
               "shard_params", "prefetch")


def assign_owners(layout: Layout, world_size: int) -> dict[int, int]:
    """group index -> owning rank, for every trainable group (frozen groups have no owner)."""
    trainable = [g for g in layout.groups if g.trainable]
    if len(trainable) < world_size:
        raise ValueError(
            f"world_size={world_size} is larger than the number of trainable chunk groups ({len(trainable)}, of "
            f"capacity {layout.chunk_elements} elements): every rank must own at least one group; lower chunk_size "
            f"(e.g. chunk_size={max(4096, layout.trainable_numel // (2 * world_size))}) or run fewer ranks")
    loads = [0] * world_size
    owners: dict[int, int] = {}
    for group in sorted(trainable, key=lambda g: (-g.capacity, g.index)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[group.index] = rank
        loads[rank] += group.capacity
    return owners


def describe(layout: Layout, config, param_groups) -> dict:
    """What must be identical on every rank: the training keys of the config, every parameter
    (name, shape, trainable), the chunk groups, and the optimizer's groups."""
    settings = config.to_dict()
    return {
        "config": {k: settings[k] for k in SHARED_KEYS},
        "parameters": [[s.name, list(s.shape), s.trainable] for s in layout.slots],
        "chunk_groups": [[g.capacity, g.trainable, [s.name for s in g.slots]] for g in layout.groups],
        "param_groups": [[{k: repr(v) for k, v in sorted(hyper.items())}, [s.name for s in slots]]
                         for hyper, slots in param_groups],
    }


def _fingerprint(description: dict) -> int:
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1   # fits an int64


def first_difference(a, b, path: str = "") -> str:
    """Where two descriptions first differ, as 'path: A vs B'."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b or a[key] != b[key]:
                if key in a and key in b:
                    return first_difference(a[key], b[key], f"{path}.{key}" if path else str(key))
                return f"{path}.{key}: {'missing' if key not in a else a[key]!r} vs " \
                       f"{'missing' if key not in b else b[key]!r}"
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, f"{path}[{i}]")
        if len(a) != len(b):
            return f"{path}: {len(a)} entries vs {len(b)}"
    return f"{path}: {a!r} vs {b!r}"


def check_same_everywhere(comm: Comm, description: dict, what: str, fix: str) -> None:
    """All-gather a fingerprint of ``description``; on a mismatch every rank raises a
    ValueError naming the ranks that differ from rank 0 and the first difference."""
    mine = torch.tensor([_fingerprint(description)], dtype=torch.int64)
    prints = [int(t.item()) for t in comm.all_gather(mine, f"the {what} fingerprint")]
    if len(set(prints)) == 1:
        return
    descriptions = comm.all_gather_object(description, f"the {what} descriptions")
    lines = [f"rank {r} differs from rank 0 in {first_difference(descriptions[0], d)}"
             for r, d in enumerate(descriptions) if r and prints[r] != prints[0]]
    raise ValueError(f"hetmem data parallel: the ranks do not have the same {what}: " + "; ".join(lines) + f"; {fix}")


def check_same_layout(comm: Comm, layout: Layout, config, param_groups) -> None:
    check_same_everywhere(comm, describe(layout, config, param_groups), "model, chunk layout and config",
                          "every rank must build the same model and pass the same config and optimizer groups "
                          "to hetmem.initialize (device, nvme_dir and the budgets may differ)")
