"""The C++ aio op, loaded once; None (with ONE warning) when it cannot be built."""
from __future__ import annotations

import logging
import threading

logger = logging.getLogger("hetmem.nvme")

_lock = threading.Lock()
_state: dict[str, object] = {}


def aio_op():
    """The extension module, or None after logging why the pure-Python fallback runs."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        from hetmem.ops.builder import OpBuildError, builder, check_fallback_allowed

        try:
            module = builder("aio").load()
        except OpBuildError as exc:
            check_fallback_allowed(builder("aio"), exc)
            logger.warning("hetmem aio op unavailable (%s); NVMe IO falls back to the slower pure-Python "
                           "thread pool (buffered pread/pwrite, no O_DIRECT)", exc)
            module = None
            _state["error"] = str(exc)
        _state["module"] = module
        return module


def aio_op_error() -> str | None:
    """Why aio_op() returned None (None when it loaded or was not tried yet)."""
    return _state.get("error")  # type: ignore[return-value]


def aio_op_if_built():
    """The op if it is loadable without compiling (prebuilt or cached), else None; never builds."""
    with _lock:
        if "module" in _state:
            return _state["module"]
    from hetmem.ops.builder import builder

    b = builder("aio")
    if b.disabled_reason() is not None:
        return aio_op()  # disabled: None, with the one warning
    status = b.status()
    if status.startswith(("built", "prebuilt")):
        return aio_op()
    return None


def _reset_for_tests() -> None:
    with _lock:
        _state.clear()
