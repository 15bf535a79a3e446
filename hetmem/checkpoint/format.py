"""What a checkpoint version folder holds, and how each file is read back verified.

    meta.json         {"crc32": "<8 hex>", "meta": {...}}: the crc32 of the exact bytes of the
                      "meta" value; it indexes every other file (size, checksum) and every tensor
    params.bin        per parameter: weights, exp_avg, exp_avg_sq, back to back (no padding)
    buffers.bin       the model's buffers, back to back
    rng.json          torch (CPU, CUDA), Python and NumPy random states as JSON numbers
    optimizer.json    the optimizer's param_groups hyperparameters
    client_state.pt   the caller's client_state (torch.save; loaded with weights_only=True)
    lr_scheduler.pt   the scheduler's state_dict (the same)

A tensor record is {"dtype", "shape", "offset", "nbytes", "crc"}; records tile their file
exactly, so every byte of every file is under a checksum.
"""
from __future__ import annotations

import io
import json
import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hetmem.checkpoint.files import CURRENT, LATEST, checksum, read_pointer

FORMAT = "hetmem-checkpoint"
VERSION = 2
META, PARAMS, BUFFERS = "meta.json", "params.bin", "buffers.bin"
RNG, OPTIMIZER, CLIENT, SCHEDULER = "rng.json", "optimizer.json", "client_state.pt", "lr_scheduler.pt"
FIELDS = ("weights", "exp_avg", "exp_avg_sq")   # a frozen parameter has only weights
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}
BLOCK = 16 << 20   # bytes read at a time when verifying


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded here: names the file, what is wrong, what to do."""


@dataclass
class CheckpointParts:
    """What a checkpoint reads and writes, handed over by the engine (hetmem/engine.py)."""

    layout: Any              # hetmem.layout.Layout: parameter slots and chunk groups
    manager: Any             # hetmem.chunk_manager.ChunkManager: reads and writes chunk bytes anywhere
    module: nn.Module        # buffers and state_dict keys
    scaler: Any              # hetmem.loss_scaler.LossScaler
    config: Any              # hetmem.Config
    optimizer: Any           # its param_groups' hyperparameters are saved, when it has them
    global_step: int
    micro_step: int
    awaiting_backward: bool  # a forward ran without its backward


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, where: str) -> torch.dtype:
    if name not in DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {name!r}")
    return DTYPES[name]


# -- meta.json -----------------------------------------------------------------------------

_PREFIX = '{"crc32": "%08x", "meta": '


def encode_meta(meta: dict) -> bytes:
    body = json.dumps(meta, indent=1).encode()
    return (_PREFIX % zlib.crc32(body)).encode() + body + b"}\n"


def read_meta(folder: Path) -> dict:
    """meta.json, its checksum verified and its format and version checked."""
    path = folder / META
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete") from None
    head, at = len(_PREFIX % 0), _PREFIX.index("%")
    body = data[head:-2]
    try:
        crc = int(data[at:at + 8], 16)
    except ValueError:
        crc = None
    if crc is None or data[:head] != (_PREFIX % crc).encode() or data[-2:] != b"}\n" or zlib.crc32(body) != crc:
        if data.lstrip().startswith(b"{") and b'"crc32"' not in data[:head]:
            _refuse_old(path, data)
        raise CheckpointError(f"{path} fails its crc32 check (or is not a hetmem meta.json); the file is corrupted")
    meta = json.loads(body)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder} is not a hetmem checkpoint (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{folder} has checkpoint format version {meta.get('version')}; this hetmem reads "
                              f"version {VERSION}" + ("; upgrade hetmem" if meta.get("version", 0) > VERSION else ""))
    return meta


def _refuse_old(path: Path, data: bytes) -> None:
    try:
        old = json.loads(data)
    except ValueError:
        return
    if isinstance(old, dict) and old.get("format") == FORMAT and old.get("version") == 1:
        raise CheckpointError(f"{path.parent} is a format version 1 checkpoint (chunk layout dependent), which is no "
                              f"longer read: version 2 stores each parameter by name; there is no converter "
                              f"(version 1 predates any release), so save it again from a running engine")


# -- finding the folder --------------------------------------------------------------------

def resolve(directory: str | os.PathLike, tag: str | None = None) -> Path:
    """The version folder to read: of ``directory/tag``, of the tag ``latest`` names, of the
    tag folder ``directory`` itself, or ``directory`` when it holds meta.json."""
    root = Path(directory)
    if tag is not None:
        tag_dir = root / tag
    elif (root / LATEST).is_file():
        tag_dir = root / read_pointer(root / LATEST)
    else:
        tag_dir = root
    version = read_pointer(tag_dir / CURRENT)
    if version is None and (tag_dir / META).is_file():
        return tag_dir
    if version is None:
        if tag_dir != root:
            raise CheckpointError(f"checkpoint folder {str(tag_dir)!r} is missing or incomplete (no {CURRENT} file)")
        raise CheckpointError(f"{str(root)!r} holds no checkpoint (no {LATEST}, {CURRENT} or {META} file)")
    folder = tag_dir / version
    if not (folder / META).is_file():
        raise CheckpointError(f"{tag_dir / CURRENT} names {version!r}, which has no {META}; the checkpoint is "
                              f"damaged")
    return folder


# -- tensors -------------------------------------------------------------------------------

class TensorFile:
    """Records of one data file, each read checksum-verified."""

    def __init__(self, folder: Path, name: str, algorithm: str):
        self.path = folder / name
        self.algorithm = algorithm
        try:
            self.handle = open(self.path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} is missing; the checkpoint is incomplete") from None

    def read_into(self, record: dict, out: torch.Tensor, what: str) -> torch.Tensor:
        """Fill ``out`` (contiguous CPU, record's byte size) with the record's bytes."""
        raw = out.reshape(-1).view(torch.uint8)
        if raw.numel() != record["nbytes"]:
            raise CheckpointError(f"{self.path}: {what} has {record['nbytes']} bytes, expected {raw.numel()}")
        self.handle.seek(record["offset"])
        got = self.handle.readinto(memoryview(raw.numpy()))
        self._check(record, what, got, checksum(self.algorithm, raw) if got == record["nbytes"] else None)
        return out

    def verify(self, record: dict, what: str, scratch: torch.Tensor) -> None:
        """Read and checksum the record in blocks of ``scratch`` (uint8) without keeping it."""
        self.handle.seek(record["offset"])
        crc, left, got = 0, record["nbytes"], 0
        view = memoryview(scratch.numpy())
        while left:
            n = self.handle.readinto(view[:min(left, len(view))])
            if not n:
                break
            crc = checksum(self.algorithm, scratch[:n], crc)
            got, left = got + n, left - n
        self._check(record, what, got, crc)

    def _check(self, record: dict, what: str, got: int, crc: int | None) -> None:
        if got != record["nbytes"]:
            raise CheckpointError(f"{self.path} is truncated: {what} needs {record['nbytes']} bytes at offset "
                                  f"{record['offset']}, found {got}")
        if crc != record["crc"]:
            raise CheckpointError(f"{self.path}: {what} ({record['nbytes']} bytes at offset {record['offset']}) "
                                  f"fails its {self.algorithm} check; the file is corrupted")

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def param_file(record: dict) -> str:
    """The data file a parameter tensor record is in: params.bin, or a rank's shard file
    (``params.rank-<R>.bin``) in a checkpoint saved by ranks in parallel (hetmem/distributed)."""
    return record.get("file", PARAMS)


class TensorFiles:
    """Every data file a checkpoint's parameter records name, opened on first use."""

    def __init__(self, folder: Path, algorithm: str):
        self.folder = folder
        self.algorithm = algorithm
        self._open: dict[str, TensorFile] = {}

    def of(self, record: dict) -> TensorFile:
        name = param_file(record)
        if "/" in name or name.startswith("."):
            raise CheckpointError(f"{self.folder / META} names a data file {name!r} outside the checkpoint")
        if name not in self._open:
            self._open[name] = TensorFile(self.folder, name, self.algorithm)
        return self._open[name]

    def __enter__(self) -> "TensorFiles":
        return self

    def __exit__(self, *exc) -> None:
        for f in self._open.values():
            f.close()


def check_param_tiling(folder: Path, records: list[tuple[str, dict]]) -> None:
    """``check_tiling`` for each data file the parameter records name."""
    by_file: dict[str, list[tuple[str, dict]]] = {}
    for what, record in records:
        by_file.setdefault(param_file(record), []).append((what, record))
    for name, members in by_file.items():
        check_tiling(folder, name, members)


def check_tiling(folder: Path, name: str, records: list[tuple[str, dict]]) -> None:
    """The records cover the file exactly, so no byte escapes a checksum."""
    path = folder / name
    end = 0
    for what, record in sorted(records, key=lambda r: r[1]["offset"]):
        if record["offset"] != end:
            raise CheckpointError(f"{folder / META} indexes {what} at offset {record['offset']} of {name}, "
                                  f"expected {end}; the index is inconsistent")
        end += record["nbytes"]
    size = path.stat().st_size if path.exists() else None
    if size is None:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    if size != end:
        raise CheckpointError(f"{path} has {size} bytes, its index {end}; the file is "
                              f"{'truncated' if size < end else 'damaged'}")


def read_small_file(folder: Path, name: str, entry: dict, algorithm: str) -> bytes:
    path = folder / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete") from None
    crc = checksum(algorithm, torch.frombuffer(bytearray(data), dtype=torch.uint8)) if data else 0
    if len(data) != entry["nbytes"] or crc != entry["crc"]:
        raise CheckpointError(f"{path} fails its {algorithm} check ({len(data)} bytes, expected "
                              f"{entry['nbytes']}); the file is corrupted")
    return data


def load_torch_bytes(data: bytes, path: Path) -> Any:
    """torch.load with weights_only=True: tensors, numbers, strings, containers; never code."""
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # UnpicklingError or what a damaged zip raises
        raise CheckpointError(f"{path} cannot be loaded with torch.load(weights_only=True): {exc}") from None


# -- random states -------------------------------------------------------------------------

def _rng_state(accelerator) -> dict:
    """CPU, Python and NumPy generators, and the compute device's own (asked of the seam)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    device_states = accelerator.rng_state()
    if device_states is not None:
        state["device"] = device_states
    return state


def _set_rng_state(state: dict, accelerator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "device" in state:
        accelerator.set_rng_state(state["device"])


def encode_rng(state: dict) -> dict:
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    out = {"torch": state["torch"].tolist(), "python": [version, list(internal), gauss],
           "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    if "device" in state:
        out["device"] = [s.tolist() for s in state["device"]]
    return out


def decode_rng(data: dict, path: Path) -> dict:
    try:
        version, internal, gauss = data["python"]
        name, keys, pos, has_gauss, cached = data["numpy"]
        state = {"torch": torch.tensor(data["torch"], dtype=torch.uint8),
                 "python": (int(version), tuple(int(v) for v in internal), gauss),
                 "numpy": (name, np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))}
        if "device" in data:
            state["device"] = [torch.tensor(s, dtype=torch.uint8) for s in data["device"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} does not hold random states as written by hetmem ({exc!r})") from None
    return state


# -- optimizer groups ----------------------------------------------------------------------

def _jsonable(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) and _jsonable(v) for v in value)
    return False


def encode_groups(optimizer: Any, names_of: dict[int, str]) -> list[dict] | None:
    """Each group's hyperparameters (every key but "params" with a JSON-able value); None for an
    optimizer without param_groups."""
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        return None
    out = []
    for group in groups:
        hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()
                 if k != "params" and _jsonable(v)}
        tuples = sorted(k for k, v in group.items() if k in hyper and isinstance(v, tuple))
        out.append({"hyper": hyper, "tuples": tuples, "params": group_param_names(group, names_of)})
    return out


def group_param_names(group: dict, names_of: dict[int, str]) -> list[str] | None:
    """The parameter names of a param group (None when one is not the model's)."""
    names = [names_of.get(id(p)) for p in group.get("params", [])]
    return None if None in names else names


def check_groups(saved: list[dict] | None, optimizer: Any, names_of: dict[int, str], folder: Path) -> None:
    """The optimizer has as many groups as were saved, holding the same parameters."""
    own = getattr(optimizer, "param_groups", None)
    if saved is None or own is None:
        return
    if len(saved) != len(own):
        raise CheckpointError(f"{folder} holds {len(saved)} optimizer param_groups, this engine's optimizer has "
                              f"{len(own)}; build the optimizer with the same groups as when it was saved")
    for i, (entry, group) in enumerate(zip(saved, own)):
        names = group_param_names(group, names_of)
        if entry["params"] is not None and names is not None and entry["params"] != names:
            raise CheckpointError(f"{folder}: optimizer param_groups[{i}] held {len(entry['params'])} parameters "
                                  f"({', '.join(entry['params'][:3])}, ...) when saved and holds {len(names)} here "
                                  f"({', '.join(names[:3])}, ...); build the optimizer with the same groups")


def restore_groups(optimizer: Any, saved: list[dict]) -> None:
    for group, entry in zip(getattr(optimizer, "param_groups", None) or [], saved):
        for key, value in entry["hyper"].items():
            group[key] = tuple(value) if key in entry["tuples"] else value
