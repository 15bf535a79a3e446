"""Run IO cases that used to hang, in a process of their own (tests/nvme/test_no_hang.py).

    python -m tests.nvme.hang_worker DIR CASE:BACKEND [CASE:BACKEND ...]

Prints one JSON line per finished case: what the request's wait() raised and what followed.
The caller runs this with a hard timeout, so a regression fails the test instead of hanging
the suite; a case that hangs dumps every thread's stack to stderr first.
"""
from __future__ import annotations

import errno
import faulthandler
import json
import os
import sys

import torch

from hetmem.nvme import AsyncFile


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def wait_error(req) -> dict:
    try:
        req.wait()
    except OSError as exc:
        return {"errno": exc.errno, "message": str(exc), "filename": exc.filename}
    return {"errno": None}


def main(case: str, backend: str, folder: str) -> dict:
    data = torch.arange(1 << 20, dtype=torch.uint8)  # 1 MiB, 4 blocks of 256 KiB
    f = AsyncFile(os.path.join(folder, "f.bin"), backend=backend, block_size=256 * 1024, queue_depth=2)
    out: dict = {"backend": f.backend}
    if case == "huge_offset":  # pwrite at 2**63: the worker's pwrite raises or the kernel refuses
        out["first"] = wait_error(f.pwrite(data, 2 ** 63))
        f.pwrite(data, 0).wait()  # the file still works
    elif case == "worker_exception":  # any exception in a python_threads worker
        from hetmem.nvme import fallback

        def broken(*args):
            raise RuntimeError("injected worker failure")

        fallback.PythonThreadFile._transfer = broken
        out["first"] = wait_error(f.pwrite(data, 0))
    elif case == "reap_error":  # a persistent io_uring_enter / io_getevents error
        f.pwrite(data, 0).wait()
        before = threads()
        f.inject_fault("reap_error", errno=errno.EBADF)
        out["first"] = wait_error(f.pwrite(data, 1 << 20))
        out["later"] = wait_error(f.pwrite(data, 2 << 20))  # the queue is broken: fails at once
        while threads() >= before:  # the reaper exits (the caller's timeout bounds this loop)
            os.sched_yield()
        out["reaper_exited"] = True
    elif case == "submit_eagain":  # io_uring_enter / io_submit keep failing with EAGAIN
        f.pwrite(data, 0).wait()
        f.inject_fault("submit_error", errno=errno.EAGAIN)  # persistent
        out["first"] = wait_error(f.pwrite(data, 1 << 20))
        f.inject_fault("none")  # the condition clears: the file works again
        back = torch.empty_like(data)
        f.pwrite(data.flip(0), 1 << 20).wait()
        f.pread(back, 1 << 20).wait()
        out["later_exact"] = torch.equal(back, data.flip(0))
        f.inject_fault("submit_error", errno=errno.EAGAIN, count=3)  # transient
        f.pwrite(data, 2 << 20).wait()
        f.pread(back, 2 << 20).wait()
        out["transient_exact"] = torch.equal(back, data)
    try:
        f.close()
        out["closed"] = True
    except OSError as exc:  # a failure nobody waited for: none expected
        out["closed"] = f"close raised: {exc}"
    return out


if __name__ == "__main__":
    faulthandler.dump_traceback_later(45, exit=True)  # below the caller's timeout: show where it hung
    root = sys.argv[1]
    for i, spec in enumerate(sys.argv[2:]):
        case, backend = spec.split(":")
        folder = os.path.join(root, str(i))
        os.makedirs(folder)
        print(json.dumps({"case": spec, **main(case, backend, folder)}), flush=True)
