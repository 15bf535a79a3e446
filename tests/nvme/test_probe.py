"""probe_io: one entry per backend, O_DIRECT and auto; fast; leaves nothing behind."""
from __future__ import annotations

import os
import time

import pytest

from hetmem.nvme import probe_io
from hetmem.nvme._op import aio_op


def test_probe_reports_every_backend(tmp_path):
    aio_op()
    started = time.perf_counter()
    report = probe_io(str(tmp_path))
    elapsed = time.perf_counter() - started
    assert set(report) == {"io_uring", "linux_aio", "threads", "python_threads", "o_direct", "auto"}
    assert report["python_threads"] == "ok"
    if aio_op() is not None:
        assert report["threads"] == "ok"
    else:
        assert report["threads"].startswith("unavailable") and report["auto"] == "python_threads"
    assert report["auto"] in ("io_uring", "linux_aio", "threads", "python_threads")
    assert report[report["auto"]] == "ok"
    assert report["o_direct"].startswith(("ok (alignment", "refused"))
    for name in ("io_uring", "linux_aio"):
        assert report[name] == "ok" or report[name].startswith(("fails", "unavailable"))
    assert os.listdir(tmp_path) == []
    assert elapsed < 0.5, f"probe_io took {elapsed:.2f} s"


def test_probe_of_a_missing_dir_raises(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        probe_io(str(tmp_path / "missing"))


def test_probe_on_a_file_system_without_o_direct(ramfs):
    report = probe_io(str(ramfs))
    assert report["o_direct"].startswith("refused")
    assert report["auto"] != "linux_aio"  # synchronous on buffered files: never picked then
    assert os.listdir(ramfs) == []
