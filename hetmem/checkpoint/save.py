"""Saving: every parameter's state by name, streamed chunk by chunk, then the pointers moved.

The sequence (each step a crash point of files.CRASH_POINTS): clean what earlier interrupted
saves left; check the free space against the bytes about to be written; write the files into
``<tag>/.tmp-<id>/`` (fsynced); rename it to ``<tag>/v-<id>``; point ``<tag>/CURRENT`` at it;
point ``latest`` at the tag; only then delete the version the tag named before, and prune.
"""
from __future__ import annotations

import datetime
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hetmem.chunk_manager.states import ChunkKind, TensorState, Tier
from hetmem.checkpoint import files
from hetmem.checkpoint.files import (CURRENT, LATEST, TMP_PREFIX, TRASH_PREFIX, VERSION_PREFIX, as_bytes, checksum,
                                     crash_point)
from hetmem.checkpoint.format import (BUFFERS, CLIENT, FORMAT, META, OPTIMIZER, PARAMS, RNG, SCHEDULER, VERSION,
                                      CheckpointParts, _rng_state, dtype_name, encode_groups, encode_meta, encode_rng)

logger = logging.getLogger("hetmem.checkpoint")

META_SLACK = 64 << 10      # bytes meta.json may take beyond its per-tensor estimate
META_PER_TENSOR = 256      # bytes per tensor record in meta.json, an upper estimate


def check_boundary(parts: CheckpointParts, what: str) -> None:
    if parts.awaiting_backward or parts.micro_step % parts.config.gradient_accumulation_steps:
        raise RuntimeError(f"{what} between micro-steps of an accumulation window: call it after "
                           f"engine.step() has taken the optimizer step")
    if any(s.state is TensorState.GRAD_IN_SLOT for s in parts.layout.slots):
        raise RuntimeError(f"{what} between engine.backward() and engine.step(); call engine.step() first")


class Staging:
    """One reusable aligned host buffer per dtype, as large as the largest chunk seen: chunks not
    in host memory are copied through it (NVMe reads and writes need the alignment)."""

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def get(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.numel() < numel:
            from hetmem.nvme import aligned_tensor

            self._buffers.pop(dtype, None)   # freed before the larger one is allocated
            buffer = self._buffers[dtype] = aligned_tensor(numel, dtype)
        return buffer[:numel]


def chunk_on_host(manager, chunk, staging: Staging) -> torch.Tensor:
    """The chunk's payload as a host tensor: itself in host memory, else a staging copy (from the
    device or NVMe) that leaves the chunk where it is."""
    manager.wait(chunk)
    if chunk.tier is Tier.HOST or (chunk.tier is Tier.DEVICE and not manager.accelerator.separate_memory):
        return chunk.payload
    return manager.read_copy(chunk, staging.get(chunk.dtype, chunk.capacity))


def group_fields(group) -> list[tuple[str, ChunkKind]]:
    """(field, chunk kind) saved for a group: fp32 weights (the master in mixed precision) and
    the Adam moments; a frozen group its weights in their dtype."""
    if not group.trainable:
        return [("weights", ChunkKind.PARAM)]
    weights = ChunkKind.MASTER if ChunkKind.MASTER in group.chunks else ChunkKind.PARAM
    return [("weights", weights), ("exp_avg", ChunkKind.EXP_AVG), ("exp_avg_sq", ChunkKind.EXP_AVG_SQ)]


def _write_params(parts: CheckpointParts, path: Path, algorithm: str, groups=None) -> list[dict]:
    """Write the tensors of ``groups`` (default: all) to ``path``; their records, layout order.
    A file other than params.bin (a rank's shard) is named in each tensor record."""
    groups = parts.layout.groups if groups is None else groups
    records = {id(s): {"name": s.name, "aliases": list(s.aliases), "shape": list(s.shape), "trainable": s.trainable,
                       "step": s.step, "tensors": {}} for g in groups for s in g.slots}
    shard = {} if path.name == PARAMS else {"file": path.name}
    staging = Staging()
    offset = 0
    with open(path, "wb") as f:
        for group in groups:
            for field, kind in group_fields(group):
                chunk = group.chunks[kind]
                payload = chunk_on_host(parts.manager, chunk, staging)
                for slot in group.slots:
                    data = as_bytes(payload.narrow(0, slot.offset, slot.numel))
                    f.write(memoryview(data.numpy()))
                    records[id(slot)]["tensors"][field] = {"dtype": dtype_name(chunk.dtype), "offset": offset,
                                                           "nbytes": data.numel(), "crc": checksum(algorithm, data),
                                                           **shard}
                    offset += data.numel()
            crash_point("params_partial")
        f.flush()
        os.fsync(f.fileno())
    return [records[id(s)] for s in parts.layout.slots if id(s) in records]


def _write_buffers(module, path: Path, algorithm: str) -> list[dict]:
    persistent = set(module.state_dict(keep_vars=True))
    records, offset = [], 0
    with open(path, "wb") as f:
        for name, buffer in module.named_buffers():
            value = buffer.detach().to("cpu").contiguous()
            data = as_bytes(value) if value.numel() else torch.empty(0, dtype=torch.uint8)
            f.write(memoryview(data.numpy()))
            records.append({"name": name, "dtype": dtype_name(value.dtype), "shape": list(value.shape),
                            "persistent": name in persistent, "offset": offset, "nbytes": data.numel(),
                            "crc": checksum(algorithm, data)})
            offset += data.numel()
        f.flush()
        os.fsync(f.fileno())
    return records


def _torch_bytes(obj: Any, what: str) -> bytes:
    """torch.save bytes of ``obj``, refused now if torch.load(weights_only=True) would refuse them."""
    buffer = io.BytesIO()
    try:
        torch.save(obj, buffer)
        data = buffer.getvalue()
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:
        raise ValueError(f"{what} cannot go into a checkpoint: checkpoints load with torch.load(weights_only=True), "
                         f"which refuses it ({str(exc).splitlines()[0]}); keep it to tensors, numbers, strings, "
                         f"bools, None and lists, tuples and dicts of them (or allow the class with "
                         f"torch.serialization.add_safe_globals)") from None
    return data


def _small_files(parts: CheckpointParts, client_state: Any, lr_scheduler: Any) -> dict[str, bytes]:
    names_of = {id(s.param): s.name for s in parts.layout.slots}
    out = {RNG: json.dumps(encode_rng(_rng_state(parts.manager.accelerator))).encode(),
           OPTIMIZER: json.dumps({"param_groups": encode_groups(parts.optimizer, names_of)}, indent=1).encode()}
    if client_state is not None:
        out[CLIENT] = _torch_bytes(client_state, "client_state")
    if lr_scheduler is not None:
        out[SCHEDULER] = _torch_bytes(lr_scheduler.state_dict(), "lr_scheduler.state_dict()")
    return out


def _data_bytes(parts: CheckpointParts) -> tuple[int, int]:
    """(bytes of params.bin and buffers.bin, tensor records) this save will write."""
    nbytes, count = 0, 0
    for group in parts.layout.groups:
        for _, kind in group_fields(group):
            # a rank holds no optimizer state of groups it does not own (hetmem/distributed): fp32
            size = group.chunks[kind].element_size if kind in group.chunks else 4
            nbytes += sum(s.numel for s in group.slots) * size
            count += len(group.slots)
    for _, buffer in parts.module.named_buffers():
        nbytes += buffer.numel() * buffer.element_size()
        count += 1
    return nbytes, count


@dataclass
class PendingSave:
    """A save between ``begin_save`` (checked, room checked, temporary folder made) and
    ``finish_save`` (files written, pointers moved)."""

    root: Path
    tag_dir: Path
    tmp: Path
    version: Path
    small: dict[str, bytes]
    need: int
    keep: int | None
    data_bytes: int


def save_checkpoint(parts: CheckpointParts, directory: str | os.PathLike, *, tag: str | None = None,
                    client_state: Any = None, keep: int | None = None, lr_scheduler: Any = None) -> Path:
    """Write the full training state as ``directory/tag`` (default ``step-<global_step>``);
    returns the tag folder."""
    pending = begin_save(parts, directory, tag=tag, client_state=client_state, keep=keep, lr_scheduler=lr_scheduler)
    return finish_save(parts, pending)


def begin_save(parts: CheckpointParts, directory: str | os.PathLike, *, tag: str | None, client_state: Any,
               keep: int | None, lr_scheduler: Any) -> PendingSave:
    """Every check, the leftovers cleaned, the free space checked, the temporary folder made."""
    check_boundary(parts, "save_checkpoint")
    tag = tag or f"step-{parts.global_step:08d}"
    if "/" in tag or tag.startswith(".") or tag in (LATEST, "") or tag.startswith(VERSION_PREFIX):
        raise ValueError(f"tag={tag!r} must be a plain folder name, not '{LATEST}' nor starting with '.' or "
                         f"'{VERSION_PREFIX}'")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep={keep!r}: give the number of checkpoints to keep (>= 1), or None to keep all")
    small = _small_files(parts, client_state, lr_scheduler)   # refuses a bad client_state before any write
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    files.clean_leftovers(root)
    crash_point("leftovers_cleaned")
    data_bytes, records = _data_bytes(parts)
    need = data_bytes + sum(map(len, small.values())) + META_SLACK + META_PER_TENSOR * records
    files.check_free_space(root, need)
    tag_dir = root / tag
    tag_dir.mkdir(exist_ok=True)
    name = files.unique_name()
    pending = PendingSave(root, tag_dir, tag_dir / f"{TMP_PREFIX}{name}", tag_dir / f"{VERSION_PREFIX}{name}",
                          small, need, keep, data_bytes)
    try:
        pending.tmp.mkdir()
        crash_point("tmp_created")
    except BaseException as exc:
        abandon_save(pending, exc)
        raise
    return pending


def abandon_save(pending: PendingSave, exc: BaseException | None = None) -> None:
    """Remove what a failed save left (never the version CURRENT names); a full disk is
    re-raised as the error that says how much room is needed."""
    tag_dir = pending.tag_dir
    current = files.read_pointer(tag_dir / CURRENT)
    for leftover in (pending.tmp, pending.version):
        if leftover.name != current:
            shutil.rmtree(leftover, ignore_errors=True)
    if current is None and tag_dir.is_dir() and not any(tag_dir.iterdir()):
        tag_dir.rmdir()
    if exc is not None and files.is_out_of_space(exc):
        raise files.no_space_error(pending.root, pending.need) from exc


def finish_save(parts: CheckpointParts, pending: PendingSave, params: list[dict] | None = None) -> Path:
    """Write the files into the temporary folder (``params``: the records of shard files
    already written there; else params.bin is written now), then move the pointers."""
    root, tag_dir, version = pending.root, pending.tag_dir, pending.version
    try:
        _write_version(parts, pending.tmp, pending.small, params)
        os.replace(pending.tmp, version)
        files.fsync_dir(tag_dir)
        crash_point("version_renamed")
        previous = files.read_pointer(tag_dir / CURRENT)
        files.replace_pointer(tag_dir / CURRENT, version.name, "current")
    except BaseException as exc:
        abandon_save(pending, exc)
        raise
    try:
        files.replace_pointer(root / LATEST, tag_dir.name, "latest")
    except OSError as exc:
        if files.is_out_of_space(exc):
            raise files.no_space_error(root, pending.need) from exc
        raise
    if previous is not None and previous != version.name and (tag_dir / previous).is_dir():
        files.remove_tree(tag_dir / previous, crash_name="old_version_removing")
    crash_point("old_version_removed")
    if pending.keep is not None:
        _prune(root, pending.keep, protect=tag_dir.name)
    logger.info("checkpoint %s written (%d parameters, %d bytes of tensors)", version, len(parts.layout.slots),
                pending.data_bytes)
    return tag_dir


def _write_version(parts: CheckpointParts, folder: Path, small: dict[str, bytes],
                   params: list[dict] | None = None) -> None:
    algorithm = files.default_algorithm()
    index = {}
    for name, data in small.items():
        files.write_file(folder / name, data)
        index[name] = {"nbytes": len(data), "crc": checksum(algorithm, torch.frombuffer(bytearray(data), dtype=torch.uint8))}
    if params is None:
        params = _write_params(parts, folder / PARAMS, algorithm)
    crash_point("params_written")
    buffers = _write_buffers(parts.module, folder / BUFFERS, algorithm)
    crash_point("buffers_written")
    param_keys = {alias for s in parts.layout.slots for alias in s.aliases}
    meta = {
        "format": FORMAT, "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hetmem_version": _version(), "torch_version": torch.__version__, "checksum": algorithm,
        "config": parts.config.to_dict(), "dtype": parts.config.dtype,
        "global_step": parts.global_step, "micro_step": parts.micro_step,
        "loss_scaler": parts.scaler.state_dict(), "loss_scaling": parts.config.uses_loss_scaling,
        "state_dict_keys": [[k, "param" if k in param_keys else "buffer"] for k in parts.module.state_dict(keep_vars=True)],
        "files": index, "params": params, "buffers": buffers,
    }
    files.write_file(folder / META, encode_meta(meta))
    files.fsync_dir(folder)
    crash_point("meta_written")


def _prune(root: Path, keep: int, protect: str) -> None:
    """Delete all but the newest ``keep`` tags (by name); each is renamed away first, so a crash
    leaves it whole or in .trash-*."""
    tags = sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / CURRENT).is_file())
    for old in tags[:-keep]:
        if old == protect:
            continue
        trash = root / f"{TRASH_PREFIX}{old}-{files.unique_name()}"
        os.replace(root / old, trash)
        crash_point("pruning")
        shutil.rmtree(trash, ignore_errors=True)


def _version() -> str:
    from hetmem import __version__

    return __version__
