"""hetmem: train PyTorch models far larger than the GPU holds.

Parameters, gradients and Adam states are packed into chunks that move between the GPU,
host memory and NVMe files, guided by a warm-up memory tracer.  See README.md.
"""
from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"

logging.getLogger("hetmem").addHandler(logging.NullHandler())

# Public names -> (module, attribute); attribute None means the module itself.  Imported on
# first access so that `import hetmem` stays cheap and never compiles anything.
_LAZY = {
    "initialize": ("hetmem.engine", "initialize"),
    "Engine": ("hetmem.engine", "Engine"),
    "Config": ("hetmem.config", "Config"),
    "AdamConfig": ("hetmem.config", "AdamConfig"),
    "Tier": ("hetmem.chunk_manager.states", "Tier"),
    "ChunkKind": ("hetmem.chunk_manager.states", "ChunkKind"),
    "DeviceBudgetError": ("hetmem.chunk_manager.manager", "DeviceBudgetError"),
    "MemoryReport": ("hetmem.report", "MemoryReport"),
    "profile": ("hetmem.profiler", "profile"),
    "optim": ("hetmem.optim", None),
    "ops": ("hetmem.ops", None),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'hetmem' has no attribute {name!r}")
    module_name, attribute = target
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value
