"""The offloader on its own: saved bytes leave the device count when offloaded and return when
restored, the values come back exactly, host bytes are bounded, transitions are checked."""
from __future__ import annotations

import gc

import pytest
import torch

from hetmem.accelerator import HostAccelerator
from hetmem.activations import ActivationLink, ActivationOffloader, EntryState
from hetmem.chunk_manager.mover import Mover
from hetmem.chunk_manager.states import IllegalTransition
from hetmem.tracer.probes import CpuProbe


@pytest.fixture
def parts():
    accelerator = HostAccelerator()
    mover = Mover(accelerator)
    probe = CpuProbe()
    room = {"bytes": 1 << 30}
    offloader = ActivationOffloader(ActivationLink(mover, accelerator), probe,
                                    moment_index=lambda: 0,
                                    host_room=lambda n: offloader.host_bytes + n <= room["bytes"])
    offloader.begin_microstep(recording=True)
    yield offloader, probe, room
    mover.close()


def test_offloaded_bytes_leave_the_device_count_and_come_back_exactly(parts):
    offloader, probe, _ = parts
    a, b = torch.randn(64, 64), torch.randn(128, 64)
    expected_a, expected_b = a.clone(), b.clone()
    packed_a, packed_b = offloader.pack(a), offloader.pack(b)
    packed_view = offloader.pack(a[3:10, 1:5].t())  # a view shares its storage's entry
    assert packed_view.entry is packed_a.entry
    assert probe.live.current == a.nbytes + b.nbytes
    offloader.relieve(1)  # a and b still hold their storages here: nothing could be freed
    assert probe.live.current == a.nbytes + b.nbytes and offloader.host_bytes == 0
    del a, b  # autograd's copies are now the only ones
    offloader.relieve(1)  # the oldest first, and only as much as asked
    assert packed_a.entry.state is EntryState.HOST and packed_b.entry.state is EntryState.RESIDENT
    assert probe.live.current == expected_b.nbytes
    assert offloader.host_bytes == expected_a.nbytes and offloader.away == expected_a.nbytes
    assert probe.live.natural_peak == expected_a.nbytes + expected_b.nbytes  # the trace's view: unchanged
    assert torch.equal(offloader.unpack(packed_view), expected_a[3:10, 1:5].t())
    assert torch.equal(offloader.unpack(packed_a), expected_a)
    assert torch.equal(offloader.unpack(packed_b), expected_b)
    assert probe.live.current == expected_a.nbytes + expected_b.nbytes
    assert offloader.host_bytes == 0 and offloader.away == 0
    stats = offloader.take_stats()
    assert stats["offloads"] == stats["restores"] == stats["late_restores"] == 1
    assert stats["offloaded_bytes"] == stats["restored_bytes"] == expected_a.nbytes
    assert offloader.records[0].used_at == 0 and offloader.records[0].nbytes == expected_a.nbytes


def test_an_entry_freed_in_host_memory_returns_its_host_bytes(parts):
    offloader, probe, _ = parts
    packed = offloader.pack(torch.randn(64, 64))
    offloader.relieve(1)
    assert packed.entry.state is EntryState.HOST and offloader.host_bytes == 64 * 64 * 4
    del packed
    gc.collect()
    assert offloader.host_bytes == 0 and offloader.away == 0 and probe.live.moved_off == 0


def test_host_budget_full_keeps_activations_on_the_device(parts):
    offloader, probe, room = parts
    room["bytes"] = 1000  # less than one activation
    packed = offloader.pack(torch.randn(64, 64))
    offloader.relieve(1)
    assert packed.entry.state is EntryState.RESIDENT and offloader.host_bytes == 0
    assert probe.live.current == 64 * 64 * 4


def test_small_and_foreign_tensors_are_left_to_the_probe(parts):
    offloader, _, _ = parts
    assert offloader.pack(torch.randn(8)) is None                        # too small to bother
    assert offloader.pack(torch.randn(64, 64, dtype=torch.complex64).conj()) is None  # lazy conj view


def test_illegal_transition_raises_naming_the_entry(parts):
    offloader, _, _ = parts
    packed = offloader.pack(torch.randn(64, 64))
    with pytest.raises(IllegalTransition, match=r"saved activation 0 \(16.00 KiB\): resident -> host"):
        packed.entry.set_state(EntryState.HOST)
