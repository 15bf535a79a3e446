"""hetmem: train PyTorch models far larger than the GPU holds.

Parameters, gradients and Adam states are packed into chunks that move between the GPU,
host memory and NVMe files, guided by a warm-up memory tracer.  See README.md.
"""
from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"

logging.getLogger("hetmem").addHandler(logging.NullHandler())

# Public names and the module that defines each, imported on first access so that
# `import hetmem` stays cheap and never compiles anything.
_LAZY = {
    "optim": "hetmem.optim",
    "ops": "hetmem.ops",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'hetmem' has no attribute {name!r}")
    module = importlib.import_module(target)
    return module if target.endswith("." + name) else getattr(module, name)
