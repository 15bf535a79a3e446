"""Optimizers backed by hetmem's C++ kernels: ``CPUAdam`` and ``CPUAdamW``."""
from __future__ import annotations

from .adam import CPUAdam, CPUAdamW

__all__ = ["CPUAdam", "CPUAdamW"]
