"""``engine.state_dict()`` under data parallelism: full fp32 weights on every rank.

In fp32 training every rank's PARAM chunks hold the current weights (owners broadcast them
after each update), so the single-process state dict is already complete.  In bf16/fp16 the
fp32 master weights of a group exist on its owner only: each trainable group's master (its
used prefix) is broadcast from the owner, in layout order, and replaces the widened
compute-dtype values the rank read from its PARAM chunk.  A collective: call it on every rank.
``engine.module.state_dict()`` is not a collective: it gives the rank's own values (exact in
fp32; in bf16/fp16 the groups a rank does not own come from the compute-dtype copy).  With
``shard_params`` (Stage 2) the PARAM chunks of other ranks' groups are gathered for the read
(every rank holds all of them in the compute dtype meanwhile) and dropped again;
``engine.module.state_dict()`` alone then raises for them (use ``engine.state_dict()``).
"""
from __future__ import annotations

import torch

from hetmem.chunk_manager.states import ChunkKind


def full_state_dict(dp, module_state, layout, manager):
    if dp.gather is None:
        state = module_state.full_precision_state_dict()
    else:  # Stage 2: the other ranks' PARAM chunks gathered for the read, dropped again after
        chunks = [g.chunks[ChunkKind.PARAM] for g in layout.groups if g.trainable]
        dp.gather.acquire(chunks)
        try:
            state = module_state.full_precision_state_dict()
        finally:
            dp.gather.release(chunks)   # dropped unless a module still uses them (mid-step)
    # every rank owns at least one group, so in bf16/fp16 every rank has some master chunk
    if not any(ChunkKind.MASTER in g.chunks for g in layout.groups):
        return state   # fp32: the PARAM chunks are the weights, current on every rank
    for group in layout.groups:
        if not group.trainable:
            continue
        buffer = torch.empty(group.used, dtype=torch.float32)
        if dp.owns(group):
            buffer.copy_(manager.payload_in_memory(group.chunks[ChunkKind.MASTER]).narrow(0, 0, group.used))
        dp.comm.broadcast(buffer, dp.owners[group.index], f"the master weights of chunk group {group.index}").wait()
        for slot in group.slots:
            value = buffer.narrow(0, slot.offset, slot.numel).view(slot.shape).clone()
            for alias in slot.aliases:
                if alias in state:
                    state[alias] = value
    return state
