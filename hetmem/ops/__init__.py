"""C++ ops and their Python wrappers.

Each op is loaded lazily on first use (see builder.py), so importing hetmem never compiles.
"""
from __future__ import annotations

import importlib

from .builder import ALL_BUILDERS, OpBuildError, OpBuilder, OpRequiredError, builder

# Public names and the submodule that defines each; imported on first access.
_LAZY = {
    "adam_step": "hetmem.ops.adam",
}

__all__ = ["ALL_BUILDERS", "OpBuildError", "OpBuilder", "OpRequiredError", "builder", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hetmem.ops' has no attribute {name!r}")
