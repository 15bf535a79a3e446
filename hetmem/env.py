"""The environment report behind `hetmem env`: what hetmem can use on this machine.

Every line is read off the machine (or an op's own answer), never assumed: torch and its
accelerator (through the seam, hetmem/accelerator/), the C++ ops (prebuilt, built, or why they cannot build), the SIMD level the CPU Adam
kernel picks, which IO backends work on a given folder, and the GPUs pynvml sees.
"""
from __future__ import annotations

import logging
import os
import platform
import tempfile
from typing import Any

logger = logging.getLogger("hetmem.env")

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch_section() -> dict[str, Any]:
    import torch

    from hetmem.accelerator.torch_device import build_info

    accelerator = build_info()
    return {"version": torch.__version__, "threads": torch.get_num_threads(),
            "accelerator_build": accelerator["build"], "accelerator": accelerator["type"],
            "accelerator_devices": accelerator["devices"]}


def _cpu_section() -> dict[str, Any]:
    import psutil

    mem = psutil.virtual_memory()
    flags = cpu_flags()
    return {
        "model": cpu_model(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_bytes": mem.total,
        "memory_available_bytes": mem.available,
        "simd_flags": [f for f in SIMD_FLAGS if f in flags],
    }


def _ops_section(build: bool) -> dict[str, Any]:
    from hetmem.ops.builder import ALL_BUILDERS, OpBuildError

    ops: dict[str, Any] = {}
    for b in ALL_BUILDERS:
        entry: dict[str, Any] = {"description": b.description}
        if build:
            try:
                b.load()
            except OpBuildError as exc:
                entry["error"] = str(exc)
        entry["status"] = b.status()
        ops[b.name] = entry
    return ops


def _simd_section(ops: dict[str, Any]) -> str:
    """The path the CPU Adam kernel dispatches to, when the op is available."""
    status = ops.get("cpu_adam", {}).get("status", "")
    if not (status.startswith("built") or status.startswith("prebuilt")):
        return "unknown until the cpu_adam op is built (run `hetmem env --build`)"
    from hetmem.ops import adam

    return adam.simd_level()


def _io_section(directory: str) -> dict[str, Any]:
    from hetmem import nvme

    return nvme.probe_io(directory)


def _gpu_section() -> dict[str, Any]:
    try:
        import pynvml
    except ImportError as exc:
        return {"gpus": [], "note": f"pynvml not importable ({exc}); `pip install nvidia-ml-py`"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"gpus": [], "note": f"none (NVML: {exc})"}
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                         "memory_total_bytes": int(mem.total), "memory_free_bytes": int(mem.free)})
        driver = pynvml.nvmlSystemGetDriverVersion()
        return {"gpus": gpus, "driver": driver.decode() if isinstance(driver, bytes) else driver}
    finally:
        pynvml.nvmlShutdown()


def _guarded(name: str, fn, *args) -> Any:
    """Run one section; a failure is reported in the section, never hides the others."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - the report must show every section's error
        logger.debug("env section %s failed", name, exc_info=True)
        return {"error": f"{type(exc).__name__}: {exc}"}


def collect(io_dir: str | None = None, build: bool = False) -> dict[str, Any]:
    """The whole report as a dict (what `hetmem env --json` prints)."""
    from hetmem import __version__

    io_dir = io_dir or tempfile.gettempdir()
    report: dict[str, Any] = {
        "hetmem": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "torch": _guarded("torch", _torch_section),
        "cpu": _guarded("cpu", _cpu_section),
    }
    report["ops"] = _guarded("ops", _ops_section, build)
    report["adam_simd_level"] = _guarded("simd", _simd_section, report["ops"])
    report["io"] = {"directory": io_dir, **_guarded("io", _io_section, io_dir)}
    report["gpu"] = _guarded("gpu", _gpu_section)
    return report


def _bytes(n: int | None) -> str:
    from hetmem.units import format_bytes

    return "?" if n is None else format_bytes(n)


def format_text(report: dict[str, Any]) -> str:
    lines = [f"hetmem {report['hetmem']}  Python {report['python']}  {report['platform']}"]
    t = report["torch"]
    if "error" in t:
        lines.append(f"torch: {t['error']}")
    else:
        build = t["accelerator_build"] or "CPU build"
        found = (f", {t['accelerator']} devices: " + ", ".join(t["accelerator_devices"]) if t["accelerator"]
                 else ", no accelerator")
        lines.append(f"torch {t['version']} ({build}{found}), {t['threads']} intra-op threads")
    c = report["cpu"]
    if "error" in c:
        lines.append(f"cpu: {c['error']}")
    else:
        lines.append(f"cpu: {c['model']}; {c['logical_cores']} logical / {c['physical_cores']} physical cores"
                     f" ({c['affinity_cores']} usable); memory {_bytes(c['memory_total_bytes'])} total,"
                     f" {_bytes(c['memory_available_bytes'])} available")
        lines.append(f"     SIMD flags: {' '.join(c['simd_flags']) or 'none'}")
    lines.append("ops:")
    ops = report["ops"]
    if "error" in ops:
        lines.append(f"  {ops['error']}")
    else:
        for name, entry in ops.items():
            lines.append(f"  {name:9s} {entry['status']}")
            if "error" in entry:
                lines.append(f"  {'':9s} {entry['error']}")
    simd = report["adam_simd_level"]
    lines.append(f"cpu adam kernel path: {simd['error'] if isinstance(simd, dict) else simd}")
    io = report["io"]
    lines.append(f"io (on {io['directory']}):")
    if "error" in io:
        lines.append(f"  {io['error']}")
    else:
        for key, value in io.items():
            if key != "directory":
                lines.append(f"  {key:15s} {value}")
    g = report["gpu"]
    if "error" in g:
        lines.append(f"gpus: {g['error']}")
    elif not g["gpus"]:
        lines.append(f"gpus: {g.get('note', 'none')}")
    else:
        lines.append(f"gpus (driver {g['driver']}):")
        for gpu in g["gpus"]:
            lines.append(f"  [{gpu['index']}] {gpu['name']}, {_bytes(gpu['memory_total_bytes'])}"
                         f" ({_bytes(gpu['memory_free_bytes'])} free)")
    return "\n".join(lines)
