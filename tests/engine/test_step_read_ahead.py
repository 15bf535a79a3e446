"""The synchronous NVMe step reads groups smaller than the largest further ahead: within the
room the plan keeps for its read-ahead, and making room only from groups it has updated
(hetmem/step_pipeline.py, ``StepPipeline._read_ahead``)."""
from __future__ import annotations

import torch

import hetmem
from hetmem.chunk_manager.states import ChunkKind, Tier

from .helpers import batches, config, pair, train_engine


def _engine(tmp_path, name: str, overlap: bool = False) -> hetmem.Engine:
    _, model = pair()
    return hetmem.initialize(model, config(device_budget="2304KiB", nvme_dir=str(tmp_path / name),
                                           host_budget="2MiB", overlap_step=overlap, step_speculation=False,
                                           nvme_pipeline_depth=1))


def _count_based(engine) -> None:
    """The read-ahead before: ``read_ahead`` groups, whatever their size."""
    pipeline = engine.adam.pipeline
    pipeline._read_ahead = lambda groups, start, count, overlapped=False: pipeline._read_ahead_from(
        groups, start, min(len(groups), start + count))


def _watch(engine) -> dict:
    """Record the reads beyond the ``read_ahead`` window (``extras``), the host bytes at each
    update when over host_budget, and every budget spill made for such a read (kind, position,
    the last group updated then)."""
    manager, pipeline, tier = engine.manager, engine.adam.pipeline, engine.manager.nvme
    seen = {"over_budget": [], "spills_for_extras": [], "extras": 0}
    state = {"current": -1, "position": {}, "extra": 0, "defragmenting": 0}
    move, update, spill_for = manager.move, pipeline.update_group, tier._spill_for

    def watched_update(group, grad_scale):
        state["current"] = state["position"].get(group.index, -1)
        if manager.bytes_on(Tier.HOST) > manager.host_limit:
            seen["over_budget"].append(manager.bytes_on(Tier.HOST))
        return update(group, grad_scale)

    def watched_move(chunk, dst, *, cause, optional=False):
        at = state["position"].get(chunk.group.index, -1)
        extra = dst is Tier.HOST and cause == "optimizer" and at > state["current"] + 1 + pipeline.read_ahead
        if dst is Tier.NVME and cause == "spill" and state["extra"] and not state["defragmenting"]:
            seen["spills_for_extras"].append((chunk.kind, at, state["current"]))
        seen["extras"] += extra
        state["extra"] += extra
        try:
            return move(chunk, dst, cause=cause, optional=optional)
        finally:
            state["extra"] -= extra

    def watched_spill_for(nbytes):  # the IO pool's defragmenting spills are not the budget's
        state["defragmenting"] += 1
        try:
            return spill_for(nbytes)
        finally:
            state["defragmenting"] -= 1

    original_advance = pipeline._advance

    def advance(pending, through):
        state["position"] = dict(pending.position)
        return original_advance(pending, through)

    manager.move, pipeline.update_group, tier._spill_for, pipeline._advance = \
        watched_move, watched_update, watched_spill_for, advance
    return seen


def test_small_groups_are_read_further_ahead_exactly_and_within_the_budget(tmp_path):
    data = batches(4)
    engines = {"bytes": _engine(tmp_path, "bytes"), "count": _engine(tmp_path, "count")}
    _count_based(engines["count"])
    seen = {name: _watch(engine) for name, engine in engines.items()}
    for engine in engines.values():
        train_engine(engine, data)
    assert engines["bytes"].adam.pipeline.read_ahead == 1 == engines["count"].adam.pipeline.read_ahead
    # groups beyond the one-group window were read, and only this way
    assert seen["bytes"]["extras"] > 0 and seen["count"]["extras"] == 0
    for name in engines:  # host memory never over host_budget at an update
        assert not seen[name]["over_budget"], (name, seen[name]["over_budget"])
    # room for those reads came only from groups already updated, never from parameters
    assert all(kind is not ChunkKind.PARAM and at <= current
               for kind, at, current in seen["bytes"]["spills_for_extras"]), seen["bytes"]["spills_for_extras"]
    # the same bytes in every chunk: the read-ahead moves IO, not values
    for a, b in zip(engines["bytes"].manager.chunks, engines["count"].manager.chunks):
        if a.tier is None:
            continue
        assert a.name == b.name
        pa = engines["bytes"].manager.payload_in_memory(a).clone()
        pb = engines["count"].manager.payload_in_memory(b).clone()
        assert torch.equal(pa, pb), a.name
    for engine in engines.values():
        engine.close()


def test_an_overlapped_step_reads_no_further_than_its_depth(tmp_path):
    engine = _engine(tmp_path, "overlapped", overlap=True)  # the next forward needs that room
    seen = _watch(engine)
    train_engine(engine, batches(4))
    assert engine.adam.pipeline.read_ahead == 1 and seen["extras"] == 0
    assert not seen["over_budget"], seen["over_budget"]
    engine.close()
