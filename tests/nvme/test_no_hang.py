"""IO that cannot hang: every worker exception and a persistent reaper or submit error fail the request.

The cases run in one subprocess with a hard timeout (tests/nvme/hang_worker.py): before these
fixes the python_threads backend swallowed a non-OSError worker exception and ``wait()``
blocked forever, and a C++ reaper whose ``io_uring_enter``/``io_getevents`` kept failing spun
at 100% CPU while ``close()`` waited for it; a submitter whose ``io_uring_enter``/``io_submit``
kept failing with EAGAIN retried forever holding the file's mutex.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.nvme.conftest import ALL_BACKENDS, probed

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60
REAPERS = ("io_uring", "linux_aio")  # the backends with a reaper thread


def _specs() -> list[str]:
    works = [b for b in ALL_BACKENDS if probed()[b] == "ok"]
    specs = [f"huge_offset:{b}" for b in works] + [f"reap_error:{b}" for b in REAPERS if b in works]
    specs += [f"submit_eagain:{b}" for b in REAPERS if b in works]
    return specs + ["worker_exception:python_threads"]  # last: it breaks the fallback for the process


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """{case:backend -> result} for every case that finished within the timeout."""
    folder = tmp_path_factory.mktemp("no_hang")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        out = subprocess.run([sys.executable, "-m", "tests.nvme.hang_worker", str(folder), *_specs()], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        stdout, stderr = out.stdout, out.stderr
    except subprocess.TimeoutExpired as exc:
        stdout, stderr = exc.stdout or "", exc.stderr or ""
        stdout, stderr = (s.decode() if isinstance(s, bytes) else s for s in (stdout, stderr))
    found = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            found[entry["case"]] = entry
    found["stderr"] = stderr[-4000:]
    return found


def result(results: dict, spec: str) -> dict:
    if spec not in results:
        pytest.fail(f"{spec} hung or crashed: no result within {TIMEOUT_S} s\n{results['stderr']}")
    return results[spec]


def test_pwrite_at_offset_2_63_fails_its_request(backend, results):
    got = result(results, f"huge_offset:{backend}")
    assert got["backend"] == backend
    first = got["first"]
    assert first["errno"] in (errno.EOVERFLOW, errno.EINVAL, errno.EFBIG), first
    assert f"pwrite of {1 << 20} B at offset {2 ** 63}" in first["message"] and first["filename"].endswith("f.bin")
    assert got["closed"] is True


def test_any_python_worker_exception_fails_its_request(results):
    got = result(results, "worker_exception:python_threads")
    assert got["first"]["errno"] == errno.EIO and "Input/output error during pwrite" in got["first"]["message"]
    assert got["closed"] is True


@pytest.mark.parametrize("reaper", REAPERS)
def test_a_persistent_reaper_error_fails_the_requests_and_the_reaper_exits(reaper, results):
    if probed()[reaper] != "ok":
        pytest.skip(f"backend {reaper} does not work here: {probed()[reaper]}")
    got = result(results, f"reap_error:{reaper}")
    for key in ("first", "later"):
        assert got[key]["errno"] == errno.EBADF, got
        assert "Bad file descriptor during pwrite" in got[key]["message"]
    assert got["reaper_exited"] is True and got["closed"] is True


@pytest.mark.parametrize("submitter", REAPERS)  # the threads backend has no submit syscall
def test_a_persistent_submit_eagain_fails_the_request_and_a_transient_one_is_retried(submitter, results):
    if probed()[submitter] != "ok":
        pytest.skip(f"backend {submitter} does not work here: {probed()[submitter]}")
    got = result(results, f"submit_eagain:{submitter}")
    first = got["first"]
    assert first["errno"] == errno.EAGAIN, got
    assert os.strerror(errno.EAGAIN) in first["message"], first
    assert f"during pwrite of {1 << 20} B at offset {1 << 20}" in first["message"], first
    assert first["filename"].endswith("f.bin")
    assert got["later_exact"] is True and got["transient_exact"] is True and got["closed"] is True


def test_submit_error_needs_a_backend_with_a_submit_syscall(tmp_path):
    from hetmem.nvme import AsyncFile

    f = AsyncFile(str(tmp_path / "f.bin"), backend="threads")
    try:
        with pytest.raises(ValueError, match="kind='submit_error' needs a backend with a submit syscall"):
            f.inject_fault("submit_error", errno=errno.EAGAIN)
    finally:
        f.close()
