"""A failed NVMe transfer is reported once, by the transfer; closing the file does not raise it again."""
from __future__ import annotations

import errno

import pytest
import torch

from hetmem.chunk_manager.mover import Transfer
from hetmem.nvme import AsyncFile


@pytest.mark.parametrize("finish", ["done", "wait"])
def test_a_failed_request_seen_by_its_transfer_is_not_raised_again_at_close(tmp_path, finish):
    f = AsyncFile(tmp_path / "swap", backend="threads", block_size="1MiB")
    f.inject_fault("error", errno=errno.EIO)
    data = torch.ones(1 << 20, dtype=torch.uint8)
    reverted = []
    transfer = Transfer.for_request(f.pwrite(data, 0), "PARAM#0 host->nvme", data.numel(), route=(), keepalive=(data,),
                                    on_error=reverted.append)
    if finish == "done":  # the manager's poll(): done() then the error
        while not transfer.done():
            pass
    else:
        with pytest.raises(OSError):
            transfer.wait()
    assert isinstance(transfer.error, OSError) and transfer.error.errno == errno.EIO
    assert reverted == [transfer.error]  # on_error put the chunk back (once)
    f.close()  # the failure was the transfer's to report: close() does not raise it again
