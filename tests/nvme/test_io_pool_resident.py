"""IoBufferPool.resident_bytes(): the kernel's count of the region's pages in memory (mincore)."""
from __future__ import annotations

from hetmem.nvme.io_pool import PAGE, IoBufferPool

MiB = 1 << 20


def test_resident_bytes_are_the_pages_touched_not_the_capacity():
    assert IoBufferPool(4 * MiB, lock="off").resident_bytes() == 4 * MiB  # prefaulted
    lazy = IoBufferPool(4 * MiB, lock="off", prefault=False, huge=False)
    assert lazy.resident_bytes() == 0
    block = lazy.take(3 * PAGE)
    block[::PAGE].fill_(1)  # one write per page faults it in
    assert lazy.resident_bytes() == 3 * PAGE
    lazy.close()
    assert lazy.resident_bytes() == 0
