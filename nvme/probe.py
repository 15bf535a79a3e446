"""probe_io: which IO backends and whether O_DIRECT work in a folder (for `hetmem env`).

Each backend does a real round trip (write 8 KiB, read it back, compare) on a scratch file
in the folder, which is removed afterwards.  The probe never compiles anything: if the
aio op is not built yet, the kernel backends are checked by setting up and tearing down
the kernel object (io_uring_setup / io_setup) through ctypes instead.
"""
from __future__ import annotations

import ctypes
import os
import platform
import uuid

import torch

from hetmem.nvme._op import aio_op_if_built
from hetmem.nvme.aio import auto_order
from hetmem.nvme.buffers import aligned_empty, release_buffer
from hetmem.nvme.config import FALLBACK_BACKEND, KERNEL_BACKENDS
from hetmem.nvme.fallback import PythonThreadFile

_PROBE_BYTES = 8192
# Syscall numbers for the ctypes check (io_uring's are the same on every architecture).
_SYSCALLS = {"x86_64": {"io_setup": 206, "io_destroy": 207}, "aarch64": {"io_setup": 0, "io_destroy": 1}}
_IO_URING_SETUP = 425


def _kernel_reason(backend: str) -> str | None:
    """Why the kernel refuses ``backend`` ("" if it allows it), None if we cannot tell."""
    if backend == "threads":
        return ""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if backend == "io_uring":
        params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
        fd = libc.syscall(_IO_URING_SETUP, ctypes.c_uint(1), params)
        if fd < 0:
            return f"io_uring_setup failed: {os.strerror(ctypes.get_errno())}"
        os.close(fd)
        return ""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        return None
    ctx = ctypes.c_ulong(0)
    if libc.syscall(numbers["io_setup"], ctypes.c_uint(1), ctypes.byref(ctx)) < 0:
        return f"io_setup failed: {os.strerror(ctypes.get_errno())}"
    libc.syscall(numbers["io_destroy"], ctx)
    return ""


def _round_trip(engine, data: torch.Tensor, back: torch.Tensor) -> str:
    rid = engine.submit(True, data.data_ptr(), _PROBE_BYTES, 4096)
    status = engine.wait(rid)
    if status[1]:
        return f"write failed: {os.strerror(status[1])}"
    back.zero_()
    rid = engine.submit(False, back.data_ptr(), _PROBE_BYTES, 4096)
    status = engine.wait(rid)
    if status[1]:
        return f"read failed: {os.strerror(status[1])}"
    return "ok" if torch.equal(data, back) else "fails: the bytes read back differ from those written"


def probe_io(directory: str) -> dict[str, str]:
    """One entry per backend ("io_uring", "linux_aio", "threads", "python_threads") with "ok"
    or why it fails here, plus "o_direct" (with the alignment) and "auto" (what
    ``backend="auto"`` runs).  Leaves no file behind."""
    if not os.path.isdir(directory):
        raise ValueError(f"directory={directory!r} is not a folder")
    op = aio_op_if_built()
    path = os.path.join(directory, f".hetmem-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    data = aligned_empty(_PROBE_BYTES)
    back = aligned_empty(_PROBE_BYTES)
    data.copy_(torch.randint(0, 256, (_PROBE_BYTES,), dtype=torch.uint8))
    result: dict[str, str] = {}
    try:
        result["o_direct"] = _probe_direct(op, path)
        direct = result["o_direct"].startswith("ok")
        for backend in KERNEL_BACKENDS:
            result[backend] = _probe_backend(op, backend, path, direct, data, back)
        engine = PythonThreadFile(path, block_size=4096, queue_depth=2, threads=1)
        try:
            result[FALLBACK_BACKEND] = _round_trip(engine, data, back)
        finally:
            engine.close()
        result["auto"] = next((b for b in auto_order(direct) if result[b].startswith("ok")), FALLBACK_BACKEND)
    finally:
        release_buffer(data)
        release_buffer(back)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return result


def _probe_direct(op, path: str) -> str:
    if op is not None:
        try:
            engine = op.File(path, backend="threads", queue_depth=1, direct=True)
        except OSError as exc:
            return f"fails: {exc}"
        try:
            if not engine.direct:
                return f"refused ({engine.direct_note}); IO here is buffered"
            return f"ok (alignment {engine.offset_align} B offsets, {engine.mem_align} B memory)"
        finally:
            engine.close()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        return f"refused ({exc.strerror}); IO here is buffered"
    os.close(fd)
    return f"ok (alignment: fs block {os.statvfs(os.path.dirname(path)).f_bsize} B; exact once the aio op is built)"


def _probe_backend(op, backend: str, path: str, direct: bool, data: torch.Tensor, back: torch.Tensor) -> str:
    if op is None:
        from hetmem.nvme._op import aio_op_error
        from hetmem.ops.builder import builder

        aio = builder("aio")
        unusable = aio.disabled_reason() or aio_op_error() or aio.toolchain_problem()
        if unusable:
            return f"unavailable: the aio op cannot be used ({unusable})"
        reason = _kernel_reason(backend)
        if reason:
            return f"fails: {reason}"
        return "ok (kernel check only: the aio op builds on first use)"
    try:
        engine = op.File(path, backend=backend, block_size=4096, queue_depth=2, direct=direct)
    except OSError as exc:
        return f"fails: {exc.strerror or exc}"
    try:
        return _round_trip(engine, data, back)
    finally:
        engine.close()
