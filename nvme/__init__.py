"""NVMe tier: async file IO, aligned buffers, swap space, and the swap benchmark core.

Public API:

- ``AsyncFile(path, *, mode="rw", backend="auto", block_size=1MiB, queue_depth=16,
  threads=1, direct=True)`` with ``pwrite(tensor, offset)`` / ``pread(tensor, offset)``
  returning a ``Request`` (``wait()``, ``done()``, ``error``); ``close()``; a context
  manager.  (hetmem/nvme/aio.py)
- ``aligned_empty(numel, dtype)`` / ``release_buffer(t)`` / ``BufferPool``: aligned,
  host buffers pinned on accelerator machines, reused.  (buffers.py)
- ``IoBufferPool(capacity, *, prefault, huge, lock, pin)``: the NVMe tier's one long-lived region
  of IO buffers (aligned, huge pages, faulted in, locked or pinned).  (io_pool.py)
- ``plan_pipeline(group_bytes, host_budget, depth)``: the NVMe optimizer step's read-ahead plan.
  (pipeline_plan.py)
- ``SwapSpace(dir, blobs, ...)`` with ``store(key, t)`` / ``load(key, into=t)`` /
  ``reserve(blobs)`` / ``recording()`` / ``close()``, and ``SwapChecksumError``; checksums taken
  and verified on worker threads (swap_checksum.py).  (swap.py)
- ``replay(records, dir, ...)``: a recorded workload's requests replayed alone, its disk time.
  (replay.py)
- ``probe_io(dir)``: which backends and O_DIRECT work there.  (probe.py)
- ``IOConfig`` / ``load_io_config(path)``: the ``nvme_*`` config keys.  (config.py)
- ``crc32c(tensor)``.  (checksum.py)
- ``hetmem.nvme.bench``: ``measure_sequential``, ``measure_mixed``, ``run_sweep`` (the disk
  benchmark core); ``hetmem.nvme.asyncio_files``: aiofiles helpers (the slow fallback for
  asyncio code).
"""
from hetmem.nvme.aio import AsyncFile, Request
from hetmem.nvme.buffers import BufferPool, aligned_empty, aligned_tensor, padded_nbytes, release_buffer
from hetmem.nvme.checksum import crc32c
from hetmem.nvme.config import CONFIG_KEYS, IOConfig, load_io_config, write_io_config
from hetmem.nvme.io_pool import IoBufferPool, MemlockError
from hetmem.nvme.pipeline_plan import PipelinePlan, plan_pipeline
from hetmem.nvme.probe import probe_io
from hetmem.nvme.swap import BlobState, SwapChecksumError, SwapSpace

__all__ = [
    "AsyncFile", "Request", "BufferPool", "aligned_empty", "aligned_tensor", "padded_nbytes", "release_buffer",
    "crc32c",
    "CONFIG_KEYS", "IOConfig", "load_io_config", "write_io_config", "probe_io", "BlobState",
    "IoBufferPool", "MemlockError", "PipelinePlan", "plan_pipeline",
    "SwapChecksumError", "SwapSpace",
]
