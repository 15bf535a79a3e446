"""Checkpoints: the whole training state, wherever each chunk lives, written atomically.

    ckpt/
      latest                 the tag of the newest complete checkpoint (replaced atomically)
      step-00000100/
        meta.json            format, config, counters, loss scale, per-parameter steps, the
                             layout it was saved from, and an index of chunks.bin
        chunks.bin           every PARAM/MASTER/EXP_AVG/EXP_AVG_SQ payload, 4 KiB aligned,
                             streamed one chunk at a time (never the whole state in memory)
        buffers.pt           the model's buffers
        rng.pt               torch (CPU and CUDA), Python and NumPy random states
        client_state.pt      what the caller passed (data position, ...), if anything

A checkpoint is written into a temporary folder, every file and the folder fsynced, then
renamed into place, and only then does ``latest`` move (temporary name, fsync, rename): a
crash at any point leaves the previous checkpoint whole and ``latest`` pointing at it.
Each chunk carries a CRC32; loading verifies it.  Checkpoints are taken between steps
(at a gradient-accumulation boundary), so no gradients need saving, and loading them into a
fresh process and training on gives bit-identical losses.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import random
import shutil
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hetmem.chunk_manager.states import ChunkKind, TensorState, Tier

if TYPE_CHECKING:
    from hetmem.engine import Engine

logger = logging.getLogger("hetmem.checkpoint")

FORMAT = "hetmem-checkpoint"
VERSION = 1
ALIGN = 4096
SAVED_KINDS = (ChunkKind.PARAM, ChunkKind.MASTER, ChunkKind.EXP_AVG, ChunkKind.EXP_AVG_SQ)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded here: named file, what is wrong, what to do."""


# -- files ------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def layout_signature(engine: "Engine") -> list:
    """What must match between the engine that saved and the one that loads."""
    return [[g.capacity, g.trainable, [[s.name, s.offset, s.numel, list(s.shape)] for s in g.slots]]
            for g in engine.layout.groups]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- chunk bytes ------------------------------------------------------------------------------

def _as_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.view(torch.uint8).numpy())


class _Staging:
    """One reusable host buffer per chunk size, for chunks not in host memory."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, int], torch.Tensor] = {}

    def get(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        key = (dtype, numel)
        if key not in self._buffers:
            from hetmem.nvme import aligned_tensor  # NVMe reads into it without a bounce buffer

            self._buffers[key] = aligned_tensor(numel, dtype)
        return self._buffers[key]


def _read_chunk(engine: "Engine", chunk, staging: _Staging) -> torch.Tensor:
    """The chunk's payload as a host tensor: itself in host memory, else a staging copy (from the
    device or NVMe) that leaves the chunk where it is."""
    engine.manager.wait(chunk)
    if chunk.tier is not Tier.NVME and chunk.payload.device.type == "cpu":
        return chunk.payload
    return engine.manager.read_copy(chunk, staging.get(chunk.dtype, chunk.capacity))


# -- save -------------------------------------------------------------------------------------

def _check_boundary(engine: "Engine", what: str) -> None:
    if engine._awaiting_backward or engine.micro_step % engine.config.gradient_accumulation_steps:
        raise RuntimeError(f"{what} between micro-steps of an accumulation window: call it after "
                           f"engine.step() has taken the optimizer step")
    if any(s.state is TensorState.GRAD_IN_SLOT for s in engine.layout.slots):
        raise RuntimeError(f"{what} between engine.backward() and engine.step(); call engine.step() first")


def save_checkpoint(engine: "Engine", directory: str | os.PathLike, *, tag: str | None = None,
                    client_state: Any = None, keep: int | None = None) -> Path:
    """Write the full training state under ``directory/tag``; returns that folder."""
    _check_boundary(engine, "save_checkpoint")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tag = tag or f"step-{engine.global_step:08d}"
    if "/" in tag or tag.startswith("."):
        raise ValueError(f"tag={tag!r} must be a plain folder name")
    _clean_stale(root)
    tmp = root / f".tmp-{tag}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    index = []
    staging = _Staging()
    with open(tmp / "chunks.bin", "wb") as f:
        for group in engine.layout.groups:
            for kind in SAVED_KINDS:
                chunk = group.chunks.get(kind)
                if chunk is None:
                    continue
                data = _as_bytes(_read_chunk(engine, chunk, staging))
                offset = f.tell()
                f.write(data)
                pad = -f.tell() % ALIGN
                if pad:
                    f.write(b"\0" * pad)
                index.append({"group": group.index, "kind": kind.name, "dtype": str(chunk.dtype),
                              "offset": offset, "nbytes": len(data), "crc32": zlib.crc32(data)})
        f.flush()
        os.fsync(f.fileno())
    _torch_save({n: b.detach().cpu() for n, b in engine.module.named_buffers()}, tmp / "buffers.pt")
    _torch_save(_rng_state(), tmp / "rng.pt")
    if client_state is not None:
        _torch_save(client_state, tmp / "client_state.pt")
    meta = {
        "format": FORMAT, "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hetmem_version": _version(), "torch_version": torch.__version__,
        "config": engine.config.to_dict(), "dtype": engine.config.dtype,
        "global_step": engine.global_step, "micro_step": engine.micro_step,
        "loss_scaler": engine.scaler.state_dict(),
        "param_steps": {s.name: s.step for s in engine.layout.slots},
        "state_dict_keys": _state_dict_keys(engine),
        "aliases": {alias: s.name for s in engine.layout.slots for alias in s.aliases if alias != s.name},
        "layout": layout_signature(engine), "chunks": index,
        "client_state": client_state is not None,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    with open(tmp / "meta.json", "rb") as f:
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    final = root / tag
    if final.exists():  # the same tag again: swap the new one in, then drop the old
        trash = root / f".trash-{tag}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / "latest", tag.encode())
    if keep is not None:
        _prune(root, keep, protect=tag)
    logger.info("checkpoint %s written (%d chunks)", final, len(index))
    return final


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(root: Path) -> None:
    """Remove what a crashed save left (.tmp-*/.trash-* of dead or this process)."""
    for entry in root.iterdir():
        if not entry.name.startswith((".tmp-", ".trash-")):
            continue
        pid = entry.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            logger.info("removing %s left by an interrupted save", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _prune(root: Path, keep: int, protect: str) -> None:
    tags = sorted(p for p in root.iterdir() if p.is_dir() and (p / "meta.json").is_file()
                  and not p.name.startswith("."))
    for old in tags[:-keep] if keep > 0 else []:
        if old.name != protect:
            shutil.rmtree(old)


def _state_dict_keys(engine: "Engine") -> list[list[str]]:
    """[key, "param" | "buffer"] in model.state_dict() order (for export without an engine)."""
    keys = []
    for key in engine.module.state_dict(keep_vars=True):
        keys.append([key, "param" if key in engine.layout.by_name else "buffer"])
    return keys


def _version() -> str:
    from hetmem import __version__

    return __version__


# -- load -------------------------------------------------------------------------------------

def resolve(directory: str | os.PathLike, tag: str | None = None) -> Path:
    """The checkpoint folder: ``directory/tag``, ``directory/<latest>``, or ``directory`` itself."""
    root = Path(directory)
    if tag is not None:
        folder = root / tag
    elif (root / "meta.json").is_file():
        folder = root
    elif (root / "latest").is_file():
        folder = root / (root / "latest").read_text().strip()
    else:
        raise CheckpointError(f"{str(root)!r} holds no checkpoint (no meta.json and no 'latest' file)")
    if not (folder / "meta.json").is_file():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} is missing or incomplete (no meta.json)")
    return folder


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder / 'meta.json'} is not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder} is not a hetmem checkpoint (format {meta.get('format')!r})")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{folder} has checkpoint format version {meta['version']}, newer than the "
                              f"{VERSION} this hetmem reads; upgrade hetmem")
    return meta


def read_chunk_bytes(folder: Path, entry: dict, handle=None) -> bytes:
    """One chunk's bytes from chunks.bin, CRC-checked."""
    path = folder / "chunks.bin"
    own = handle is None
    f = open(path, "rb") if own else handle
    try:
        f.seek(entry["offset"])
        data = f.read(entry["nbytes"])
    finally:
        if own:
            f.close()
    if len(data) != entry["nbytes"]:
        raise CheckpointError(f"{path} is truncated: chunk {entry['kind']}#{entry['group']} needs "
                              f"{entry['nbytes']} bytes at offset {entry['offset']}, found {len(data)}")
    if zlib.crc32(data) != entry["crc32"]:
        raise CheckpointError(f"{path}: chunk {entry['kind']}#{entry['group']} (offset {entry['offset']}, "
                              f"{entry['nbytes']} bytes) fails its CRC32 check; the file is corrupted")
    return data


def load_checkpoint(engine: "Engine", directory: str | os.PathLike, *, tag: str | None = None) -> Any:
    """Restore the state saved by save_checkpoint; returns the client state (or None)."""
    _check_boundary(engine, "load_checkpoint")
    folder = resolve(directory, tag)
    meta = read_meta(folder)
    if meta["dtype"] != engine.config.dtype:
        raise CheckpointError(f"{folder} was saved with dtype={meta['dtype']!r}, this engine uses "
                              f"{engine.config.dtype!r}; initialize with the same dtype")
    if meta["layout"] != layout_signature(engine):
        raise CheckpointError(f"{folder} was saved from another model or chunk layout (parameters, shapes or "
                              f"chunk_size differ); initialize the same model with the same chunk_size")
    groups = {g.index: g for g in engine.layout.groups}
    with open(folder / "chunks.bin", "rb") as f:
        for entry in meta["chunks"]:
            chunk = groups[entry["group"]].chunks.get(ChunkKind[entry["kind"]])
            if chunk is None:
                raise CheckpointError(f"{folder}: chunk {entry['kind']}#{entry['group']} has no place in "
                                      f"this engine")
            data = read_chunk_bytes(folder, entry, f)
            host = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(chunk.dtype)
            engine.manager.write_from(chunk, host)
    for group in engine.layout.groups:
        engine.manager.rebind(group.chunks[ChunkKind.PARAM])
    buffers = torch.load(folder / "buffers.pt", weights_only=True)
    own = dict(engine.module.named_buffers())
    for name, value in buffers.items():
        if name in own:
            with torch.no_grad():
                own[name].copy_(value)
    steps = meta["param_steps"]
    for slot in engine.layout.slots:
        slot.step = int(steps[slot.name])
    engine.global_step = int(meta["global_step"])
    engine.micro_step = int(meta["micro_step"])
    engine.scaler.load_state_dict(meta["loss_scaler"])
    _set_rng_state(torch.load(folder / "rng.pt", weights_only=False))
    logger.info("checkpoint %s loaded (step %d)", folder, engine.global_step)
    if meta.get("client_state"):
        return torch.load(folder / "client_state.pt", weights_only=False)
    return None
