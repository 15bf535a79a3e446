"""Speculation reads past the next group during backward (hetmem/speculation.py ``_read_ahead``):
when the groups after it do not fit ``READ_SHARE`` of host_budget, ``_make_room`` starts the
stores that make the room and a later moment reads them.  Training stays bit-identical to the
synchronous step; only Adam state outside the groups being read is sent (never parameters or
gradients); host memory never goes past host_budget; an IO error while it stores leaves an
engine that trains on exactly."""
from __future__ import annotations

import errno

import pytest

import hetmem
from hetmem.chunk_manager.states import ChunkKind, Tier
from hetmem.speculation import Speculation
from tests.engine.checkpoint_state import assert_same_state, training_state

from .helpers import FailingStore, assert_no_pins, batches, config, pair, train_engine, watch_sends

STATE = {ChunkKind.MASTER, ChunkKind.EXP_AVG, ChunkKind.EXP_AVG_SQ}
HOST = {"bf16": "26MiB", "fp32": "40MiB"}  # parameters take part of it; the state mostly lives on NVMe


@pytest.fixture(autouse=True)
def _deterministic(monkeypatch):
    """Complete groups wait for their state: what is speculated does not depend on the disk."""
    monkeypatch.setattr(Speculation, "blocking", True)


def _engine(tmp_path, name: str, dtype: str, speculate: bool) -> hetmem.Engine:
    _, model = pair(d_model=256, n_layer=4)
    return hetmem.initialize(model, config(device_budget="5MiB", host_budget=HOST[dtype], chunk_size="1MiB",
                                           dtype=dtype, nvme_dir=str(tmp_path / name), memory_trace=False,
                                           overlap_step=speculate, step_speculation=speculate))


def _watch(engine) -> dict:
    """Every chunk ``_make_room`` sends (kind, group, the groups it had to keep) and host bytes
    over host_budget after any move."""
    return watch_sends(engine, engine.adam.speculation, "_make_room",
                       lambda chunk, dst, args: (chunk.kind, chunk.group.index, frozenset(args[2]), dst))


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_room_made_for_speculation_reads_is_exact_and_sends_only_state(tmp_path, dtype):
    data = batches(5)
    sync, spec = _engine(tmp_path, "sync", dtype, False), _engine(tmp_path, "spec", dtype, True)
    seen = _watch(spec)
    assert train_engine(spec, data) == train_engine(sync, data)
    assert spec.manager.bytes_on(Tier.NVME) > spec.manager.bytes_on(Tier.HOST), "state must live on NVMe"
    assert spec.adam.speculation.stats()["speculated_groups"] > 0
    assert seen["sent"], "speculation must start stores for the room its later reads need"
    for kind, group, keep, dst in seen["sent"]:
        assert dst is Tier.NVME and kind in STATE, kind
        assert group not in keep, "a group being read ahead is never sent"
    assert not seen["over_budget"]
    assert_same_state(training_state(spec), training_state(sync))  # bitwise, every chunk and step count
    assert_no_pins(spec)
    for engine in (sync, spec):
        engine.close()


def _fail_first_store(spec, make_request):
    """The first store ``_make_room`` issues goes through ``make_request(chunk, payload, store)``;
    returns the state (``fired``)."""
    speculation, tier = spec.adam.speculation, spec.manager.nvme
    make_room, store = speculation._make_room, tier.store
    state = {"fired": 0, "inside": False}

    def watched_make_room(nbytes, limit, keep):
        state["inside"] = True
        try:
            return make_room(nbytes, limit, keep)
        finally:
            state["inside"] = False

    def failing_store(chunk, payload):
        if state["inside"] and not state["fired"]:
            state["fired"] += 1
            return make_request(chunk, payload, store)
        return store(chunk, payload)

    speculation._make_room = watched_make_room
    tier.store = failing_store
    return state


def _raise_at_once(chunk, payload, store):
    raise OSError(errno.EIO, "injected error issuing a store")


def _fail_when_it_lands(chunk, payload, store):
    return FailingStore(store(chunk, payload))


@pytest.mark.parametrize("fail", [_raise_at_once, _fail_when_it_lands], ids=["at-once", "when-it-lands"])
def test_an_io_error_while_making_room_leaves_an_engine_that_trains_on_exactly(tmp_path, fail, caplog):
    """Raised when issued: the speculation stops for that backward (logged) and the step applies
    the rest.  Reported when it lands: backward raises it (as any failed transfer it meets), its
    speculation is rolled back and its gradients dropped.  Either way the engine then trains
    exactly like the synchronous one (whose backward is dropped too in the second case)."""
    data = batches(6, seed=2)
    sync, spec = _engine(tmp_path, "sync", "bf16", False), _engine(tmp_path, "spec", "bf16", True)
    state = _fail_first_store(spec, fail)
    for x, y in data:
        loss = spec(x, y)
        expected = sync(x, y)
        assert loss.item() == expected.item()
        try:
            spec.backward(loss)
        except OSError as exc:
            assert fail is _fail_when_it_lands and "injected write error" in str(exc)
            spec.zero_grad()
            sync.backward(expected)
            sync.zero_grad()
            continue
        sync.backward(expected)
        for engine in (spec, sync):
            engine.step()
    assert state["fired"] == 1, "the failure must have been injected"
    if fail is _raise_at_once:
        assert "stopped by an IO error" in caplog.text
    got, expected = training_state(spec), training_state(sync)
    if fail is _fail_when_it_lands:  # the counters differ in the micro-steps only: spec's backward raised
        assert got["counters"][0] == expected["counters"][0]
    assert_same_state(got, expected, skip=("counters",) if fail is _fail_when_it_lands else ())
    assert_no_pins(spec)
    nvme = sum(c.nbytes for c in spec.manager.chunks if c.tier is Tier.NVME)
    host = sum(c.nbytes for c in spec.manager.chunks if c.tier is Tier.HOST)
    assert spec.manager.bytes_on(Tier.NVME) == nvme and spec.manager.bytes_on(Tier.HOST) == host
    for engine in (sync, spec):
        engine.close()


def test_make_room_sends_only_state_outside_keep_and_nothing_when_it_cannot_make_it(tmp_path):
    data = batches(3)
    spec = _engine(tmp_path, "spec", "bf16", True)
    train_engine(spec, data)
    speculation, manager = spec.adam.speculation, spec.manager
    spec.adam.finish_pending()
    groups = sorted({c.group.index for c in manager.chunks if c.kind in STATE})[:2]
    for chunk in [c for c in manager.chunks if c.kind in STATE and c.group.index in groups]:
        manager.move(chunk, Tier.HOST, cause="test")  # two groups' state in host memory, clean
        manager.wait(chunk)
    held = [c for c in manager.chunks if c.tier is Tier.HOST and c.kind in STATE and manager.can_spill(c)]
    assert len({c.group.index for c in held}) >= 2, "the test needs Adam state of two groups in host memory"
    keep = {held[0].group.index}
    seen = _watch(spec)
    before = manager.bytes_on(Tier.HOST)
    # more than every spillable state chunk could free: nothing is sent
    speculation._make_room(manager.host_limit, manager.host_limit, keep)
    assert not seen["sent"] and manager.bytes_on(Tier.HOST) == before
    # a little past the budget: state outside ``keep`` goes
    wanted = manager.host_limit - before + 1
    speculation._make_room(wanted, manager.host_limit, keep)
    assert seen["sent"], "room within reach must be made"
    for kind, group, kept, dst in seen["sent"]:
        assert dst is Tier.NVME and kind in STATE and group not in keep and kept == keep
    assert manager.host_excess(wanted) <= 0
    assert all(c.tier is Tier.HOST for c in held if c.group.index in keep)
    spec.close()
