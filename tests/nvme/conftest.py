"""Fixtures for the NVMe tier: backends that work here, scratch folders, small mounts."""
from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from hetmem.nvme._op import aio_op
from hetmem.nvme.probe import probe_io

ALL_BACKENDS = ("io_uring", "linux_aio", "threads", "python_threads")


def _probe() -> dict[str, str]:
    aio_op()  # build the op once, so the probe tests the real engine
    import tempfile

    return probe_io(tempfile.gettempdir())


_PROBED: dict[str, str] | None = None


def probed() -> dict[str, str]:
    global _PROBED
    if _PROBED is None:
        _PROBED = _probe()
    return _PROBED


@pytest.fixture(params=ALL_BACKENDS)
def backend(request) -> str:
    """Each backend that works here; the others are skipped with the probe's reason."""
    status = probed()[request.param]
    if status != "ok":
        pytest.skip(f"backend {request.param} does not work here: {status}")
    return request.param


@pytest.fixture(params=[b for b in ALL_BACKENDS if b != "python_threads"])
def engine_backend(request) -> str:
    """The C++ engine's backends that work here."""
    status = probed()[request.param]
    if status != "ok":
        pytest.skip(f"backend {request.param} does not work here: {status}")
    return request.param


def _mount(kind: str, target: str, options: list[str]) -> str | None:
    """Mount a `kind` file system at target; None on success, else why not."""
    if os.geteuid() != 0:
        return "mounting needs root"
    try:
        out = subprocess.run(["mount", "-t", kind, *options, kind, target], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"mount failed: {exc}"
    return None if out.returncode == 0 else f"mount -t {kind} is not permitted here: {out.stderr.strip()}"


def mounted(tmp_path, kind: str, options: list[str]):
    """Yield a fresh `kind` mount under tmp_path (unmounted after); skip where not permitted."""
    target = tmp_path / f"{kind}-{uuid.uuid4().hex[:6]}"
    target.mkdir()
    reason = _mount(kind, str(target), options)
    if reason:
        pytest.skip(reason)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (for real ENOSPC); skipped where mounting is not permitted."""
    yield from mounted(tmp_path, "tmpfs", ["-o", "size=1m"])


@pytest.fixture
def ramfs(tmp_path):
    """A ramfs, which refuses O_DIRECT; skipped where mounting is not permitted."""
    yield from mounted(tmp_path, "ramfs", [])
