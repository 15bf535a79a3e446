"""IO settings: the four config keys the runtime reads, validated once, here.

``hetmem bench nvme --write-config F`` writes exactly these keys; ``load_io_config(F)``
reads them back (and ``IOConfig.from_dict`` checks any dict that carries them):

  nvme_backend      "auto" | "io_uring" | "linux_aio" | "threads"
  nvme_block_size   bytes per IO (an int or "1MiB"); a multiple of 4096, at most 256 MiB
  nvme_queue_depth  IOs in flight per queue, 1..1024
  nvme_threads      queues (rings / AIO contexts / groups of worker threads), 1..64

``AsyncFile`` and ``SwapSpace`` take the same settings as ``backend``, ``block_size``,
``queue_depth`` and ``threads``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from hetmem._core.units import parse_size

BACKENDS = ("auto", "io_uring", "linux_aio", "threads")
KERNEL_BACKENDS = ("io_uring", "linux_aio", "threads")  # what the C++ engine runs
FALLBACK_BACKEND = "python_threads"                    # when the aio op cannot be built

# Defaults: the best 1-thread setting of `hetmem bench nvme` on the development machine
# (virtio disk, ext4); see the report in the README.  Run the benchmark on yours.
DEFAULT_BACKEND = "auto"
DEFAULT_BLOCK_SIZE = 1 << 20
DEFAULT_QUEUE_DEPTH = 16
DEFAULT_THREADS = 1

CONFIG_KEYS = ("nvme_backend", "nvme_block_size", "nvme_queue_depth", "nvme_threads")
_MAX_BLOCK_SIZE = 256 << 20


def check_backend(backend: str, *, key: str = "backend", allow_fallback: bool = True) -> str:
    allowed = BACKENDS + ((FALLBACK_BACKEND,) if allow_fallback else ())
    if backend not in allowed:
        raise ValueError(f"{key}={backend!r} is not an IO backend; use one of {', '.join(allowed)}")
    return backend


def check_block_size(value: int | str, *, key: str = "block_size") -> int:
    size = parse_size(value, key=key)
    if size <= 0 or size % 4096 or size > _MAX_BLOCK_SIZE:
        raise ValueError(f"{key}={value!r} must be a positive multiple of 4096 bytes up to 256 MiB "
                         f"(e.g. '1MiB', '4MiB', '8MiB')")
    return size


def check_int(value: Any, *, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{key}={value!r} must be an int in [{low}, {high}]")
    return value


@dataclass(frozen=True)
class IOConfig:
    """The NVMe IO settings; invalid values raise ValueError naming the key."""

    backend: str = DEFAULT_BACKEND
    block_size: int = DEFAULT_BLOCK_SIZE
    queue_depth: int = DEFAULT_QUEUE_DEPTH
    threads: int = DEFAULT_THREADS

    def __post_init__(self):
        check_backend(self.backend, key="nvme_backend", allow_fallback=False)
        object.__setattr__(self, "block_size", check_block_size(self.block_size, key="nvme_block_size"))
        check_int(self.queue_depth, key="nvme_queue_depth", low=1, high=1024)
        check_int(self.threads, key="nvme_threads", low=1, high=64)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "IOConfig":
        """From a dict with (a subset of) the ``nvme_*`` keys; unknown keys raise."""
        unknown = sorted(set(values) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown IO config key(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(CONFIG_KEYS)}")
        return cls(**{k[len("nvme_"):]: v for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        """The ``nvme_*`` keys, as written by ``--write-config``."""
        return {f"nvme_{k}": v for k, v in asdict(self).items()}

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for AsyncFile / SwapSpace."""
        return asdict(self)


def load_io_config(path: str | Path) -> dict[str, Any]:
    """Read a ``--write-config`` JSON file; returns its validated ``nvme_*`` keys.

    Raises ValueError naming the file and the bad key or value.
    """
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object with the keys {', '.join(CONFIG_KEYS)}")
    try:
        return IOConfig.from_dict(values).to_dict()
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def write_io_config(path: str | Path, config: IOConfig) -> None:
    Path(path).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
