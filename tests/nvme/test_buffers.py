"""aligned_empty and the buffer pool: alignment, padding, reuse, release errors, pinning."""
from __future__ import annotations

import pytest
import torch

from hetmem.nvme import BufferPool, aligned_empty, padded_nbytes, release_buffer


@pytest.mark.parametrize("numel,dtype", [(1, torch.uint8), (7, torch.float32), (1023, torch.bfloat16),
                                         (4096, torch.uint8), ((1 << 20) + 3, torch.float16), (17, torch.int64)])
def test_alignment_and_padding(numel, dtype):
    t = aligned_empty(numel, dtype)
    try:
        assert t.dtype == dtype and t.shape == (numel,) and t.is_contiguous() and t.device.type == "cpu"
        assert t.data_ptr() % 4096 == 0
        nbytes = numel * t.element_size()
        padded = padded_nbytes(t)
        assert padded % 4096 == 0 and nbytes <= padded < nbytes + 4096
        assert t.untyped_storage().nbytes() - (t.data_ptr() - t.untyped_storage().data_ptr()) >= padded
        t.fill_(1)  # writable
    finally:
        release_buffer(t)


def test_released_buffers_are_reused_without_allocation():
    pool = BufferPool()
    a = pool.empty(5000, torch.float32)
    ptr = a.data_ptr()
    pool.release(a)
    allocations = pool.allocations
    b = pool.empty(5000, torch.float32)
    assert b.data_ptr() == ptr and pool.allocations == allocations and pool.reuses == 1
    c = pool.empty(20000, torch.uint8)  # same padded size (20480 B), other dtype: reused too
    pool.release(b)
    d = pool.empty(20000, torch.uint8)
    assert d.data_ptr() == ptr
    assert pool.stats()["outstanding"] == 2
    pool.release(c)
    pool.release(d)
    assert pool.stats()["cached_bytes"] == 2 * 20480


def test_release_rejects_foreign_and_double_release():
    pool = BufferPool()
    t = pool.empty(10)
    with pytest.raises(ValueError, match="not a buffer handed out"):
        pool.release(torch.empty(10))
    with pytest.raises(ValueError, match="not a buffer handed out"):
        pool.release(t[1:])
    pool.release(t)
    with pytest.raises(ValueError, match="released already"):
        pool.release(t)


def test_max_cached_bytes_drops_extra_buffers():
    pool = BufferPool(max_cached_bytes=8192)
    bufs = [pool.empty(4096) for _ in range(3)]
    for b in bufs:
        pool.release(b)
    assert pool.stats()["cached_bytes"] == 8192
    pool.clear()
    assert pool.stats()["cached_bytes"] == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="numel"):
        aligned_empty(-1)
    with pytest.raises(ValueError, match="dtype"):
        aligned_empty(4, "float32")


@pytest.mark.gpu
def test_pinned_with_cuda():
    t = aligned_empty(1 << 20, torch.float32)
    try:
        assert t.is_pinned() and t.data_ptr() % 4096 == 0
        on_gpu = t.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        assert on_gpu.shape == t.shape
    finally:
        release_buffer(t)


def test_dropped_pool_buffers_are_freed_not_kept():
    import gc

    from hetmem.nvme.buffers import BufferPool

    pool = BufferPool(pin=False)
    t = pool.empty(1 << 20, torch.float32)
    ptr = t.data_ptr()
    assert pool.padded_nbytes(t) == 4 << 20
    del t
    gc.collect()
    assert pool.stats()["outstanding"] == 0  # the pool holds nothing of a dropped buffer
    assert ptr not in pool._out


def test_aligned_tensor_is_aligned_and_outside_any_pool():
    from hetmem.nvme import aligned_tensor

    t = aligned_tensor(1000, torch.bfloat16)
    assert t.data_ptr() % 4096 == 0 and t.numel() == 1000 and t.dtype == torch.bfloat16
