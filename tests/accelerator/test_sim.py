"""The simulated asynchronous device: copies land late, and the protocol is checked."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from hetmem.accelerator.sim import SimAccelerator, SimProtocolError
from hetmem.chunk_manager.manager import ChunkManager
from hetmem.chunk_manager.states import ChunkState, Tier
from hetmem.layout import build_layout
from hetmem.materialize import create_chunks

SLOW = 0.05  # seconds: long enough that the host sees a copy in flight


def slow_sim() -> SimAccelerator:
    sim = SimAccelerator(max_delay_s=SLOW)
    sim._random.uniform = lambda a, b: b  # every copy takes the full delay
    return sim


def test_a_copy_lands_late_and_its_destination_is_poison_until_then():
    sim = slow_sim()
    stream = sim.copy_stream()
    src = torch.arange(7, dtype=torch.float32)
    dst = sim.empty(7, torch.float32)
    event = sim.copy_async(dst, src, stream, "test")
    assert not event.query()
    assert torch.isnan(dst).all()          # reading before the wait sees poison
    event.synchronize()
    assert event.query()
    assert torch.equal(dst, src)
    sim.close_stream(stream)


def test_releasing_a_buffer_with_a_copy_in_flight_raises():
    sim = slow_sim()
    stream = sim.copy_stream()
    src, dst = torch.ones(5), sim.empty(5, torch.float32)
    event = sim.copy_async(dst, src, stream, "PARAM#0 host->device")
    with pytest.raises(SimProtocolError, match="released while copy 'PARAM#0 host->device'"):
        sim.released(src)
    with pytest.raises(SimProtocolError, match="in flight"):
        sim.released(dst)
    event.synchronize()
    sim.released(src)                      # after the wait: fine
    sim.close_stream(stream)


def test_a_source_written_while_its_copy_is_in_flight_fails_the_copy():
    sim = slow_sim()
    stream = sim.copy_stream()
    src, dst = torch.ones(5), sim.empty(5, torch.float32)
    event = sim.copy_async(dst, src, stream, "GRAD#1 device->host")
    src.add_(1)                            # the compute stream writes it: a race on a GPU
    with pytest.raises(SimProtocolError, match="source of copy 'GRAD#1 device->host' changed"):
        event.synchronize()
    sim.close_stream(stream)


def test_an_operation_mixing_device_and_host_tensors_raises():
    sim = SimAccelerator()
    device, host = sim.empty(4, torch.float32), torch.zeros(4)
    sim.check_colocated(device, sim.empty(4, torch.float32))
    sim.check_colocated(host, torch.ones(2))
    with pytest.raises(SimProtocolError, match="same device"):
        sim.check_colocated(device, host)


def test_allocator_statistics_and_a_peak_hetmem_never_resets():
    sim = SimAccelerator()
    a = sim.empty(1024, torch.float32)
    b = sim.empty(1024, torch.float32)
    assert sim.memory_allocated() == 8192
    del b
    assert sim.memory_allocated() == 4096
    assert sim.max_memory_allocated() == 8192
    saved = sim.hold_saved(torch.zeros(256))   # an activation autograd keeps
    assert sim.memory_allocated() == 4096 + 1024
    assert sim.new_peak() == 8192           # the all-time peak rose since hetmem last looked
    assert sim.new_peak() is None           # and has not since
    assert sim.max_memory_allocated() == 8192  # looking reset nothing: the user's peak stays
    del saved, a
    assert sim.memory_allocated() == 0


def _manager(sim):
    model = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(2)])
    layout = build_layout(model, chunk_elements=4096, max_chunk_elements=4096)
    create_chunks(layout, torch.float32, mixed=False, grad_chunks=False)
    manager = ChunkManager(layout.groups, sim)
    for group in layout.groups:
        for chunk in group.chunks.values():
            manager.place(chunk, Tier.DEVICE)
    return manager


def test_queries_change_nothing_and_poll_processes_completions():
    sim = slow_sim()
    manager = _manager(sim)
    chunk = manager.chunks[0]
    transfer = manager.move(chunk, Tier.HOST, cause="evict")
    device_then = manager.bytes_on(Tier.DEVICE)
    assert chunk.state is ChunkState.IN_FLIGHT
    time.sleep(3 * SLOW)                    # landed, not processed
    assert transfer.done() and chunk.state is ChunkState.HOLD
    assert manager.bytes_on(Tier.DEVICE) == device_then   # asking released nothing
    assert manager.counters() == manager.counters()
    manager.poll()                          # the one place completions run without a wait
    assert manager.bytes_on(Tier.DEVICE) == device_then - chunk.nbytes
    manager.close()


def test_ready_for_compute_waits_for_the_copy_on_the_simulated_device():
    sim = slow_sim()
    manager = _manager(sim)
    chunk = manager.chunks[0]
    expected = manager.payload_in_memory(chunk).clone()
    manager.move(chunk, Tier.HOST, cause="evict")
    manager.move(chunk, Tier.DEVICE, cause="fetch")
    assert torch.isnan(chunk.payload).all()  # still in flight
    waited = manager.ready_for_compute(chunk)
    assert waited > 0
    assert torch.equal(chunk.payload, expected)
    manager.close()
