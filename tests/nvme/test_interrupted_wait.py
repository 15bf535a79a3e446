"""A wait broken off after the engine handed a request's status over (Ctrl-C: KeyboardInterrupt is
raised as the engine's call returns) loses that status: the request then counts as failed with EINTR,
never as done, and the file still closes (no "unknown request id")."""
from __future__ import annotations

import errno

import pytest
import torch

from hetmem.nvme import AsyncFile

MiB = 1 << 20


def _interrupted(f: AsyncFile, req) -> None:
    """What an interrupted ``req.wait()`` leaves behind: the engine gave the status and forgot the
    request, and ``_finish`` never recorded it."""
    f._engine.wait(req._id)


def test_a_lost_status_is_a_failure_and_the_file_closes(tmp_path, backend, caplog):
    f = AsyncFile(tmp_path / "f.bin", backend=backend, block_size="1MiB", queue_depth=4)
    req = f.pwrite(torch.ones(2 * MiB, dtype=torch.uint8), 0)
    _interrupted(f, req)
    with pytest.raises(OSError) as info:
        req.wait()
    assert info.value.errno == errno.EINTR and "pwrite of 2097152 B at offset 0" in str(info.value)
    assert req.done() and "lost to an interrupted wait" in caplog.text
    f.close()  # waited for and reported: close raises nothing, and does not meet an unknown id
    assert f.closed


@pytest.mark.parametrize("poll_first", [False, True])
def test_close_reports_a_lost_status_nobody_waited_for(tmp_path, backend, poll_first):
    f = AsyncFile(tmp_path / "f.bin", backend=backend, block_size="1MiB", queue_depth=4)
    out = torch.empty(MiB, dtype=torch.uint8)
    f.pwrite(torch.ones(MiB, dtype=torch.uint8), 0).wait()
    req = f.pread(out, 0)
    _interrupted(f, req)
    if poll_first:
        assert req.done() and isinstance(req.error, OSError)  # polling finishes it as failed
    with pytest.raises(OSError) as info:
        f.close()
    assert info.value.errno == errno.EINTR and "pread" in str(info.value)
    assert f.closed
