"""The manager's accounting, moves, binding and refusals."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hetmem.accelerator import HostAccelerator
from hetmem.chunk_manager.eviction import EvictionPolicy
from hetmem.chunk_manager.manager import ChunkManager, DeviceBudgetError
from hetmem.chunk_manager.states import ChunkKind, IllegalTransition, Tier
from hetmem.materialize import create_chunks
from hetmem.layout import build_layout


def _manager(n_groups=3):
    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(n_groups)])
    layout = build_layout(model, chunk_elements=4096, max_chunk_elements=4096)
    create_chunks(layout, torch.float32, mixed=False, grad_chunks=False)
    manager = ChunkManager(layout.groups, HostAccelerator())
    for group in layout.groups:
        for chunk in group.chunks.values():
            manager.place(chunk, Tier.HOST)
    return layout, manager


def test_moves_are_accounted_and_bind_parameter_views():
    layout, manager = _manager()
    param = layout.groups[0].chunks[ChunkKind.PARAM]
    host_before = manager.bytes_on(Tier.HOST)
    manager.payload_in_memory(param).fill_(3.0)
    manager.move(param, Tier.DEVICE, cause="fetch")
    assert manager.bytes_on(Tier.DEVICE) == param.nbytes
    manager.ready_for_compute(param)
    assert manager.bytes_on(Tier.HOST) == host_before - param.nbytes  # source freed once copied
    slot = layout.groups[0].slots[0]
    assert slot.param.shape == (64, 64) and torch.all(slot.param == 3.0)
    assert param.payload.untyped_storage().data_ptr() in manager.device_storages
    manager.move(param, Tier.HOST, cause="evict")
    manager.wait(param)
    assert slot.param.numel() == 0  # placeholder while off the device
    assert manager.bytes_on(Tier.DEVICE) == 0
    assert torch.all(param.payload == 3.0)


def test_pinned_chunks_do_not_move_and_budget_error_names_the_fix():
    layout, manager = _manager()
    chunks = [g.chunks[ChunkKind.PARAM] for g in layout.groups]
    for c in chunks[:2]:
        manager.move(c, Tier.DEVICE, cause="fetch")
        manager.ready_for_compute(c)
        manager.pin(c)
    with pytest.raises(IllegalTransition, match="is in use"):
        manager.move(chunks[0], Tier.HOST, cause="evict")
    policy = EvictionPolicy(lambda cid: None)
    with pytest.raises(DeviceBudgetError, match="raise device_budget"):
        manager.make_room(chunks[2].nbytes, 2 * chunks[0].nbytes, policy, why="test")
    manager.unpin(chunks[1])
    manager.make_room(chunks[2].nbytes, 2 * chunks[0].nbytes, policy, why="test")
    assert chunks[1].tier is Tier.HOST and chunks[0].tier is Tier.DEVICE
    with pytest.raises(IllegalTransition, match="unpinned more often"):
        manager.unpin(chunks[1])


def test_a_budget_function_is_asked_again_once_copies_off_the_device_have_landed():
    """A chunk being copied off the device holds its source buffer, which the allocator-based
    budget counts among the non-model bytes: once it has landed, the room is there."""
    layout, manager = _manager(4)
    chunks = [g.chunks[ChunkKind.PARAM] for g in layout.groups]
    n = chunks[0].nbytes
    for c in chunks[:3]:
        manager.move(c, Tier.DEVICE, cause="fetch")
        manager.ready_for_compute(c)
    for c in chunks[:2]:
        manager.pin(c)
    manager.move(chunks[2], Tier.HOST, cause="evict")  # in flight: its device buffer is still allocated
    leaving = chunks[2]
    asked = []

    def budget():  # device budget 4n minus the non-model bytes the allocator shows
        asked.append(leaving.transfer is not None)
        return 3 * n - (n if leaving.transfer is not None else 0)

    policy = EvictionPolicy(lambda cid: None)
    manager.make_room(n, budget, policy, why="test")
    assert asked == [True, False], "asked on entry, and again once the copy off the device landed"
    assert leaving.tier is Tier.HOST and leaving.transfer is None
    # a fixed budget taken while the copy was in flight stays too small: the error, as before
    manager.move(chunks[2], Tier.DEVICE, cause="fetch")
    manager.ready_for_compute(chunks[2])
    manager.move(chunks[2], Tier.HOST, cause="evict")
    with pytest.raises(DeviceBudgetError, match="raise device_budget"):
        manager.make_room(n, 2 * n, policy, why="test")
    # a function that still says no after the landing is asked once more, not forever
    with pytest.raises(DeviceBudgetError, match="raise device_budget"):
        manager.make_room(2 * n, budget, policy, why="test")
    assert asked[2:] == [False, False], "asked on entry and once more, then the error"
    for c in chunks[:2]:
        manager.unpin(c)


def test_release_frees_and_accounts():
    layout, manager = _manager(1)
    chunk = layout.groups[0].chunks[ChunkKind.PARAM]
    before = manager.bytes_on(Tier.HOST)
    manager.release(chunk)
    assert chunk.tier is None and chunk.payload is None
    assert manager.bytes_on(Tier.HOST) == before - chunk.nbytes
