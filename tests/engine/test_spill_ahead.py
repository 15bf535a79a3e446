"""The NVMe optimizer step makes room for its coming reads one update early
(``nvme_spill_ahead``; hetmem/step_pipeline.py ``StepPipeline._spill_ahead``): after each
group's update it starts the stores of updated groups' optimizer state that the next reads
will need room for.  Training is bit-identical with it on or off, it sends only what the
step has updated (never parameters, never a group still to be updated), it never holds host
memory past host_budget, and an IO error while it stores leaves a step that ``engine.step()``
finishes exactly."""
from __future__ import annotations

import errno
import re

import pytest

import hetmem
from hetmem.chunk_manager.states import ChunkKind, Tier
from tests.engine.checkpoint_state import assert_same_state, training_state

from .helpers import FailingStore, assert_no_pins, batches, config, pair, train_engine, watch_sends

HOST = "26MiB"  # about half the chunk bytes (bf16, tests/engine/test_release_idle.py): the step spills


def _engine(tmp_path, name: str, **overrides) -> hetmem.Engine:
    _, model = pair(d_model=256, n_layer=4)
    settings = dict(device_budget="5MiB", host_budget=HOST, chunk_size="1MiB", dtype="bf16",
                    nvme_dir=str(tmp_path / name), nvme_pipeline_depth=1, step_speculation=False)
    settings.update(overrides)
    return hetmem.initialize(model, config(**settings))


def _watch(engine) -> dict:
    """Record every chunk ``_spill_ahead`` sends to NVMe (its kind, its group's position in the
    step, the group just updated) and host bytes over host_budget at any move."""
    def describe(chunk, dst, args):
        groups, current = args
        position = {g.index: i for i, g in enumerate(groups)}
        return chunk.kind, position.get(chunk.group.index), current, dst

    return watch_sends(engine, engine.adam.pipeline, "_spill_ahead", describe)


CASES = {  # dtype, overlap_step, step_speculation
    "bf16-sync": ("bf16", False, False),
    "bf16-overlapped": ("bf16", True, False),
    "fp32-sync": ("fp32", False, False),          # fp32: the gradients are chunks of their own
    "bf16-speculative": ("bf16", True, "auto"),   # shadow blobs for the groups updated in backward
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_spill_ahead_is_bit_identical_and_sends_only_updated_state(tmp_path, case):
    dtype, overlap, speculation = CASES[case]
    data = batches(4)
    host = {"bf16": HOST, "fp32": "14MiB"}[dtype]
    settings = dict(dtype=dtype, overlap_step=overlap, step_speculation=speculation, host_budget=host)
    off = _engine(tmp_path, "off", nvme_spill_ahead=0, **settings)
    on = _engine(tmp_path, "on", nvme_spill_ahead=2, **settings)
    assert on.adam.pipeline.spill_ahead == 2 and off.adam.pipeline.spill_ahead == 0
    seen_off, seen_on = _watch(off), _watch(on)
    expected = train_engine(off, data)
    losses = train_engine(on, data)
    assert on.manager.bytes_on(Tier.NVME) > 0 and on.manager.moved_bytes > 0, "state must live on NVMe"
    assert seen_on["sent"], "the step must make room for its reads one update early"
    assert not seen_off["sent"], "nvme_spill_ahead=0 must send nothing early"
    for kind, position, current, dst in seen_on["sent"]:
        assert dst is Tier.NVME
        assert kind is not ChunkKind.PARAM, "parameters are never sent early"
        assert position is not None and position <= current, "only groups the step has updated go"
    assert not seen_on["over_budget"] and not seen_off["over_budget"]
    assert losses == expected
    assert_same_state(training_state(on), training_state(off))  # bitwise, every chunk and step count
    off.close()
    on.close()


def _failing_spill_ahead(engine, fail):
    """Inject ``fail(chunk, dst, cause, move)`` into the first ``manager.move`` inside
    ``_spill_ahead`` once armed; returns the state (``armed``, ``failed_at``: the group just
    updated when it fired)."""
    manager, pipeline = engine.manager, engine.adam.pipeline
    move, spill_ahead = manager.move, pipeline._spill_ahead
    state = {"armed": False, "inside": None, "failed_at": None}

    def watched_spill_ahead(groups, current):
        state["inside"] = current
        try:
            return spill_ahead(groups, current)
        finally:
            state["inside"] = None

    def flaky_move(chunk, dst, *, cause, optional=False):
        if state["armed"] and state["inside"] is not None and state["failed_at"] is None:
            state["failed_at"] = state["inside"]
            return fail(chunk, dst, cause, move)
        return move(chunk, dst, cause=cause, optional=optional)

    pipeline._spill_ahead, manager.move = watched_spill_ahead, flaky_move
    return state


def _raise_at_once(chunk, dst, cause, move):
    raise OSError(errno.EIO, "injected IO error")


def _fail_when_it_lands(engine):
    tier = engine.manager.nvme

    def fail(chunk, dst, cause, move):
        store = tier.store
        tier.store = lambda c, payload: FailingStore(store(c, payload), "injected IO error (the store failed)")
        try:
            return move(chunk, dst, cause=cause)
        finally:
            tier.store = store
    return fail


def _store_raises(engine):
    tier = engine.manager.nvme

    def fail(chunk, dst, cause, move):
        store = tier.store

        def raising(c, payload):
            raise OSError(errno.EIO, "injected IO error (store refused)")
        tier.store = raising
        try:
            return move(chunk, dst, cause=cause)
        finally:
            tier.store = store
    return fail


@pytest.mark.parametrize("when", ["at-once", "store-raises", "when-it-lands"])
def test_an_io_error_while_spilling_ahead_leaves_a_step_that_step_finishes_exactly(tmp_path, when):
    engines = {name: _engine(tmp_path, name, overlap_step=False) for name in ("faulty", "clean")}
    data = batches(4, seed=4)
    fail = {"at-once": lambda engine: _raise_at_once, "store-raises": _store_raises,
            "when-it-lands": _fail_when_it_lands}[when](engines["faulty"])
    state = _failing_spill_ahead(engines["faulty"], fail)
    for name, engine in engines.items():
        for i, (x, y) in enumerate(data):
            engine.backward(engine(x, y))
            if name == "faulty" and i == 2:
                state["armed"] = True
                with pytest.raises(OSError, match=r"interrupted by an IO error after updating (\d+) of \d+ chunk "
                                                  r"groups .*injected.*call engine.step\(\) again") as info:
                    engine.step()
                pending = engine.adam.pending
                assert state["failed_at"] is not None, "the injected error must fire inside _spill_ahead"
                assert pending is not None and pending.interrupted
                updated = int(re.search(r"after updating (\d+) of", str(info.value)).group(1))
                assert updated == pending.next
                if when != "when-it-lands":  # raised in _spill_ahead itself, right after its group's update
                    assert pending.next == state["failed_at"] + 1
                else:  # raised where the next read waits for the room the store was to free
                    assert pending.next >= state["failed_at"] + 1
            assert engine.step()
    assert_same_state(training_state(engines["faulty"]), training_state(engines["clean"]))
    assert engines["faulty"].global_step == engines["clean"].global_step == 4
    for engine in engines.values():
        assert_no_pins(engine)
        manager = engine.manager
        assert manager.bytes_on(Tier.NVME) == sum(c.nbytes for c in manager.chunks if c.tier is Tier.NVME)
        assert manager.bytes_on(Tier.HOST) == sum(c.nbytes for c in manager.chunks if c.tier is Tier.HOST)
        engine.close()


@pytest.mark.parametrize("value", [-1, 9, True, 1.0, "2", None])
def test_a_bad_spill_ahead_setting_names_the_key(value):
    with pytest.raises(ValueError, match="nvme_spill_ahead"):
        hetmem.Config(nvme_spill_ahead=value)
