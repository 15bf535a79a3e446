"""Run a function in a child process under a RAM limit, and say how it ended and what it used.

The benchmarks that compare memory (train_scale.py, nvme_vs_deepspeed.py) run each contender in
its own child process, so its peak RSS is its own and an out-of-memory end is an outcome, not a
crash of the benchmark.  The limit, best first:

- a memory cgroup made for the child (cgroup v2 ``memory.max``, or v1 ``memory.limit_in_bytes``
  with swap included), nested under this process's own cgroup so it can only tighten what
  applies already: it counts resident memory, the thing being compared, and the kernel's OOM
  killer ends the child when it is passed;
- else ``RLIMIT_AS``: it counts virtual address space, which torch's thread pools and glibc's
  arenas reserve far beyond what they touch, so the same limit is stricter than it looks
  (the result says which one applied).

Protocol: the parent runs ``python -c "...child_main()"`` with a JSON spec on stdin
(``module``, ``function``, ``kwargs``); the child calls ``module.function(**kwargs)``, which
returns a JSON-able dict, and prints one line ``RESULT_MARK`` + JSON with that dict plus its
peak RSS.  A MemoryError or torch's "not enough memory" in the child is reported as
``out_of_memory`` too.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("hetmem.benchmarks.memlimit")

RESULT_MARK = "HETMEM-CHILD-RESULT "
PREFER = ("cgroup", "rlimit")
_counter = itertools.count()
# the child loads this file by path, so it starts without importing hetmem (or torch) itself
_CHILD_BOOT = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('hetmem_memlimit_child', "
               "sys.argv[1]); module = importlib.util.module_from_spec(spec); sys.modules[spec.name] = module; "
               "spec.loader.exec_module(module); "
               "module.child_main()")
_OOM_TEXT = ("not enough memory", "can't allocate memory", "cannot allocate memory", "out of memory",
             "std::bad_alloc")


@dataclass
class Limit:
    """How a child's memory is limited: ``kind`` is "cgroup2", "cgroup1", "rlimit_as" or "none"."""
    kind: str
    nbytes: int | None
    path: str | None = None   # the cgroup folder made for the child

    def note(self) -> str:
        if self.kind == "none":
            return "no memory limit"
        what = {"cgroup2": "cgroup v2 memory.max (resident memory)",
                "cgroup1": "cgroup v1 memory.limit_in_bytes + memsw (resident memory)",
                "rlimit_as": "RLIMIT_AS (virtual address space: stricter than RSS; no writable memory cgroup here)"}
        return f"{self.nbytes / 2**30:.2f} GiB via {what[self.kind]}"


def _own_cgroup_dirs() -> list[tuple[str, Path]]:
    """(version, folder) of this process's memory cgroup, v2 first."""
    found = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if hierarchy == "0" and controllers == "":
            for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                if (root / "cgroup.controllers").exists():
                    found.insert(0, ("cgroup2", root / rel))
                    break
        elif "memory" in controllers.split(","):
            found.append(("cgroup1", Path("/sys/fs/cgroup/memory") / rel))
    return found


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def make_limit(nbytes: int | None, *, prefer: str = "cgroup") -> Limit:
    """A limit of ``nbytes`` for one child: a fresh cgroup under ours if we may make one, else RLIMIT_AS."""
    if prefer not in PREFER:
        raise ValueError(f"prefer={prefer!r} is not a limit kind; use one of {', '.join(PREFER)}")
    if nbytes is None:
        return Limit("none", None)
    if prefer == "cgroup":
        for version, own in _own_cgroup_dirs():
            folder = own / f"hetmem-limit-{os.getpid()}-{next(_counter)}"
            try:
                folder.mkdir()
            except OSError as exc:
                logger.info("cannot make a %s memory cgroup under %s (%s); trying the next way", version, own, exc)
                continue
            try:
                if version == "cgroup2":
                    _write(folder / "memory.max", str(nbytes))
                    if (folder / "memory.swap.max").exists():
                        _write(folder / "memory.swap.max", "0")
                else:
                    _write(folder / "memory.limit_in_bytes", str(nbytes))
                    if (folder / "memory.memsw.limit_in_bytes").exists():
                        _write(folder / "memory.memsw.limit_in_bytes", str(nbytes))
                return Limit(version, nbytes, str(folder))
            except OSError as exc:
                logger.info("cannot set a limit in %s (%s); trying the next way", folder, exc)
                folder.rmdir()
        logger.info("no writable memory cgroup: the child gets RLIMIT_AS (address space, stricter than RSS)")
    return Limit("rlimit_as", nbytes)


def _cgroup_figures(limit: Limit) -> dict:
    folder = Path(limit.path)
    out = {}
    try:
        if limit.kind == "cgroup2":
            if (folder / "memory.peak").exists():
                out["cgroup_peak_bytes"] = int((folder / "memory.peak").read_text())
            events = dict(line.split() for line in (folder / "memory.events").read_text().splitlines())
            out["oom_kills"] = int(events.get("oom_kill", 0))
        else:
            out["cgroup_peak_bytes"] = int((folder / "memory.max_usage_in_bytes").read_text())
            control = dict(line.split() for line in (folder / "memory.oom_control").read_text().splitlines())
            out["oom_kills"] = int(control.get("oom_kill", 0))
            out["limit_hits"] = int((folder / "memory.failcnt").read_text())
    except (OSError, ValueError):
        pass
    return out


def _remove(limit: Limit) -> None:
    if limit.path is None:
        return
    for _ in range(300):  # the exited child's charges move to the parent; after an OOM kill that takes longer
        try:
            os.rmdir(limit.path)
            return
        except OSError as exc:
            error = exc
            time.sleep(0.1)
    logger.warning("could not remove the memory cgroup %s (%s); it is empty, remove it with rmdir", limit.path, error)


def _enter(limit: Limit):
    """preexec_fn for the child: join the cgroup or set RLIMIT_AS."""
    def enter() -> None:
        if limit.kind in ("cgroup1", "cgroup2"):
            _write(Path(limit.path) / "cgroup.procs", str(os.getpid()))
        elif limit.kind == "rlimit_as":
            resource.setrlimit(resource.RLIMIT_AS, (limit.nbytes, limit.nbytes))
    return enter


def _package_root() -> str:
    """The folder holding the ``hetmem`` package (the checkout, or site-packages)."""
    import hetmem

    return str(Path(hetmem.__file__).resolve().parent.parent)


def run_limited(module: str, function: str, kwargs: dict, *, limit_bytes: int | None, timeout_s: float,
                env: dict | None = None, prefer: str = "cgroup") -> dict:
    """Run ``module.function(**kwargs)`` in a child under the limit; its result dict plus
    ``ok``, ``outcome`` ("ok", "out_of_memory", "error", "timeout"), ``peak_rss_bytes``,
    ``limit`` (what applied), ``wall_s``."""
    limit = make_limit(limit_bytes, prefer=prefer)
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), child_env.get("PYTHONPATH")) if p)
    spec = json.dumps({"module": module, "function": function, "kwargs": kwargs})
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD_BOOT, __file__], input=spec, capture_output=True,
                              text=True, timeout=timeout_s, env=child_env, preexec_fn=_enter(limit))
        stdout, stderr, returncode = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        stdout, stderr, returncode = exc.stdout or "", exc.stderr or "", None
        if isinstance(stdout, bytes):
            stdout, stderr = stdout.decode(errors="replace"), (stderr or b"").decode(errors="replace")
    wall = time.perf_counter() - started
    figures = _cgroup_figures(limit) if limit.path else {}
    _remove(limit)
    result = parse_child_output(stdout, stderr, returncode)
    result.update(figures)
    result.update({"limit": {"kind": limit.kind, "bytes": limit.nbytes, "note": limit.note()}, "wall_s": wall})
    if result["outcome"] == "error" and figures.get("oom_kills"):
        result["outcome"], result["ok"] = "out_of_memory", False
    return result


def parse_child_output(stdout: str, stderr: str, returncode: int | None) -> dict:
    """The child's result line, or how it ended without one."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
            result.setdefault("ok", result.get("outcome") == "ok")
            return result
    if returncode is None:
        return {"ok": False, "outcome": "timeout", "error": "the child ran past its time limit"}
    tail = (stderr or "").strip().splitlines()[-3:]
    if returncode == -signal.SIGKILL:
        return {"ok": False, "outcome": "out_of_memory",
                "error": "killed (SIGKILL: the OOM killer at the memory limit)", "stderr_tail": tail}
    return {"ok": False, "outcome": "error", "error": f"exit status {returncode}", "stderr_tail": tail}


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(t in str(exc).lower() for t in _OOM_TEXT)


def _peak_rss() -> int:
    """VmHWM of this process (memory_accounting.peak_rss, without importing hetmem here)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def child_main() -> None:
    """Entry point in the child: run the spec read from stdin, print the result line."""
    import importlib

    spec = json.loads(sys.stdin.read())
    try:
        func = getattr(importlib.import_module(spec["module"]), spec["function"])
        result = dict(func(**spec["kwargs"]))
        result.setdefault("outcome", "ok")
    except BaseException as exc:  # noqa: BLE001 - the child reports every end to the parent
        result = {"outcome": "out_of_memory" if is_out_of_memory(exc) else "error",
                  "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                  "traceback_tail": traceback.format_exc().splitlines()[-4:]}
    result["ok"] = result["outcome"] == "ok"
    result["peak_rss_bytes"] = _peak_rss()
    sys.stdout.write("\n" + RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (large heaps, IO threads): the result is out
