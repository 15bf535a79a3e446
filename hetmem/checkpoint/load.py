"""Loading: verify everything first, then write it into the engine chunk by chunk.

Phase 1 changes nothing: meta.json's checksum, format and version; the size and checksum of
every file and of every tensor (streamed, never the whole model in memory); parameter names,
shapes, trainability and dtypes against this engine; buffers; the accumulation boundary;
the optimizer's groups; random states and client state decoded; last, the scheduler state is
loaded into the scheduler (put back as it was if that fails).
Phase 2 fills each of the engine's chunks from the tensors of the parameters it holds (a
staging buffer per chunk, written wherever the chunk lives) and sets the rest.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hetmem.chunk_manager.states import ChunkKind
from hetmem.checkpoint import files
from hetmem.checkpoint.files import CURRENT, LATEST, VERSION_PREFIX
from hetmem.checkpoint.format import (BLOCK, BUFFERS, CLIENT, DTYPES, META, OPTIMIZER, RNG, SCHEDULER,
                                      CheckpointError, CheckpointParts, TensorFile, TensorFiles, _set_rng_state, check_groups,
                                      check_param_tiling, check_tiling,
                                      decode_rng, load_torch_bytes, parse_dtype, read_meta, read_small_file, resolve,
                                      restore_groups)
from hetmem.checkpoint.save import Staging, check_boundary, group_fields

logger = logging.getLogger("hetmem.checkpoint")

FIELD_OF_KIND = {ChunkKind.PARAM: "weights", ChunkKind.MASTER: "weights", ChunkKind.EXP_AVG: "exp_avg",
                 ChunkKind.EXP_AVG_SQ: "exp_avg_sq"}
SHOWN = 5   # names listed in a mismatch error


@dataclass
class Restored:
    """What the engine itself sets after a load."""

    global_step: int
    micro_step: int
    client_state: Any


@dataclass
class _Verified:
    """Everything phase 2 needs, checked."""

    algorithm: str
    records: dict[int, dict]              # id(slot) -> its parameter record in meta.json
    buffers: dict[str, torch.Tensor]      # name -> value (buffers are small)
    rng: dict
    groups: list[dict] | None             # None: saved from an optimizer without param_groups
    client_state: Any
    scheduler_state: Any


def load_checkpoint(parts: CheckpointParts, directory: str | os.PathLike, *, tag: str | None = None,
                    lr_scheduler: Any = None) -> Restored:
    """Restore the state saved by save_checkpoint, or change nothing and raise."""
    check_boundary(parts, "load_checkpoint")
    folder = resolve(directory, tag)
    _clean_around(folder)
    meta = read_meta(folder)
    try:
        verified = _verify(parts, folder, meta, lr_scheduler)
    except (KeyError, TypeError, AttributeError) as exc:  # a meta.json with the right checksum, not written by hetmem
        raise CheckpointError(f"{folder / META} lacks or mangles an entry hetmem writes ({exc!r})") from None
    try:
        _apply(parts, folder, meta, verified)
    except BaseException as exc:
        exc.add_note(f"hetmem: loading {folder} failed after it was verified, while writing it into the engine; "
                     f"the engine is partly loaded: load a checkpoint again before training on")
        raise
    logger.info("checkpoint %s loaded (step %d)", folder, meta["global_step"])
    return Restored(int(meta["global_step"]), int(meta["micro_step"]), verified.client_state)


def _clean_around(folder: Path) -> None:
    """Leftovers of interrupted saves next to what is loaded (best effort: it may be read-only)."""
    tag_dir = folder.parent
    if not (folder.name.startswith(VERSION_PREFIX) and (tag_dir / CURRENT).is_file()):
        return
    try:
        files.clean_tag(tag_dir)
        if (tag_dir.parent / LATEST).is_file():
            files.clean_leftovers(tag_dir.parent)
    except OSError as exc:
        logger.info("could not clean leftovers of interrupted saves next to %s: %s", folder, exc)


# -- phase 1 -------------------------------------------------------------------------------

def _verify(parts: CheckpointParts, folder: Path, meta: dict, lr_scheduler: Any) -> _Verified:
    algorithm = meta.get("checksum")
    if algorithm not in ("crc32c", "crc32"):
        raise CheckpointError(f"{folder / META}: unknown checksum algorithm {algorithm!r}")
    if algorithm == "crc32c":
        from hetmem.nvme._op import aio_op

        if aio_op() is None:
            logger.warning("%s uses crc32c checksums and the aio op is unavailable: verifying them in pure "
                           "Python, at a few MB/s", folder)
    small = {name: read_small_file(folder, name, entry, algorithm) for name, entry in meta["files"].items()}
    for name in (RNG, OPTIMIZER):
        if name not in small:
            raise CheckpointError(f"{folder / META} lists no {name}; the checkpoint is incomplete")
    params = [(f"parameter {p['name']!r} {field}", t) for p in meta["params"] for field, t in p["tensors"].items()]
    buffers = [(f"buffer {b['name']!r}", b) for b in meta["buffers"]]
    check_param_tiling(folder, params)
    check_tiling(folder, BUFFERS, buffers)
    scratch = torch.empty(BLOCK, dtype=torch.uint8)
    with TensorFiles(folder, algorithm) as f:
        for what, record in params:
            f.of(record).verify(record, what, scratch)
    records = _match_params(parts, folder, meta)
    values = _read_buffers(parts, folder, meta, algorithm)
    accumulation = parts.config.gradient_accumulation_steps
    if meta["micro_step"] % accumulation:
        raise CheckpointError(f"{folder} was saved after micro-step {meta['micro_step']}, which is not a boundary of "
                              f"gradient_accumulation_steps={accumulation}; load it with the "
                              f"gradient_accumulation_steps it was saved with ({meta['config'].get('gradient_accumulation_steps')})")
    groups = json.loads(small[OPTIMIZER])["param_groups"]
    check_groups(groups, parts.optimizer, {id(s.param): s.name for s in parts.layout.slots}, folder)
    scheduler_state = None
    if lr_scheduler is not None:
        if SCHEDULER not in small:
            raise CheckpointError(f"{folder} holds no lr_scheduler state (it was saved without lr_scheduler=); "
                                  f"load it without lr_scheduler=")
        scheduler_state = load_torch_bytes(small[SCHEDULER], folder / SCHEDULER)
    elif SCHEDULER in small:
        logger.info("%s holds an lr_scheduler state; pass lr_scheduler= to load_checkpoint to restore it", folder)
    client_state = load_torch_bytes(small[CLIENT], folder / CLIENT) if CLIENT in small else None
    rng = decode_rng(json.loads(small[RNG]), folder / RNG)
    if lr_scheduler is not None:  # last: it is the one check that changes something (undone on failure)
        _load_scheduler(lr_scheduler, scheduler_state, folder / SCHEDULER)
    return _Verified(algorithm, records, values, rng, groups, client_state, scheduler_state)


def _load_scheduler(lr_scheduler: Any, state: Any, path: Path) -> None:
    """Torch's schedulers take any dict (``__dict__.update``): check the keys and the per-group
    list lengths first; a load_state_dict that raises is undone."""
    backup = lr_scheduler.state_dict()
    kind = type(lr_scheduler).__name__
    if not isinstance(state, dict) or set(state) != set(backup):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} holds a scheduler state with keys {keys}, this {kind} has {sorted(backup)}; "
                              f"pass the kind of scheduler it was saved from")
    for key, value in backup.items():
        if isinstance(value, list) and isinstance(state[key], list) and len(value) != len(state[key]):
            raise CheckpointError(f"{path} holds a scheduler over {len(state[key])} param groups ({key!r}), this "
                                  f"{kind} has {len(value)}; build it over the same optimizer groups")
    try:
        lr_scheduler.load_state_dict(state)
    except Exception as exc:
        lr_scheduler.load_state_dict(backup)
        raise CheckpointError(f"{path} does not fit this {kind}: {exc}; pass the kind of scheduler it was saved "
                              f"from") from None


def _mismatch(folder: Path, problems: list[str], fix: str) -> None:
    if problems:
        shown = "; ".join(problems[:SHOWN]) + (f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else "")
        raise CheckpointError(f"{folder} does not fit this model: {shown}; {fix}")


def _match_params(parts: CheckpointParts, folder: Path, meta: dict) -> dict[int, dict]:
    """Each slot's record, by its name (or any of its tied names); every mismatch named."""
    by_name = {alias: p for p in meta["params"] for alias in p["aliases"]}
    matched, used, problems = {}, set(), []
    for slot in parts.layout.slots:
        record = next((by_name[a] for a in slot.aliases if a in by_name), None)
        if record is None:
            problems.append(f"parameter {slot.name!r} is not in the checkpoint")
            continue
        used.add(record["name"])
        if list(record["shape"]) != list(slot.shape):
            problems.append(f"parameter {slot.name!r} has shape {tuple(record['shape'])} there, {tuple(slot.shape)} here")
            continue
        if record["trainable"] != slot.trainable:
            state = "frozen there (no Adam state saved)" if slot.trainable else "trainable there"
            problems.append(f"parameter {slot.name!r} is {state} but {'trainable' if slot.trainable else 'frozen'} here")
            continue
        for field, _ in group_fields(slot.group):
            tensor = record["tensors"].get(field)
            dtype = parse_dtype(tensor["dtype"], f"{folder / META}") if tensor else None
            if dtype is None or not dtype.is_floating_point or \
                    tensor["nbytes"] != slot.numel * torch.empty((), dtype=dtype).element_size():
                problems.append(f"parameter {slot.name!r} has no valid {field} record")
        matched[id(slot)] = record
    problems += [f"the checkpoint's parameter {p['name']!r} is not in this model" for p in meta["params"]
                 if p["name"] not in used]
    _mismatch(folder, problems, "initialize the model the checkpoint was saved from")
    return matched


def _read_buffers(parts: CheckpointParts, folder: Path, meta: dict, algorithm: str) -> dict[str, torch.Tensor]:
    own = dict(parts.module.named_buffers())
    saved = {b["name"]: b for b in meta["buffers"]}
    problems = [f"buffer {n!r} is not in the checkpoint" for n in own if n not in saved]
    problems += [f"the checkpoint's buffer {n!r} is not in this model" for n in saved if n not in own]
    values = {}
    with TensorFile(folder, BUFFERS, algorithm) as f:
        for name, record in saved.items():
            if name not in own:
                continue
            dtype = parse_dtype(record["dtype"], f"{folder / META}")
            if dtype != own[name].dtype or list(record["shape"]) != list(own[name].shape):
                problems.append(f"buffer {name!r} is {record['dtype']} {tuple(record['shape'])} there, "
                                f"{str(own[name].dtype).removeprefix('torch.')} {tuple(own[name].shape)} here")
                continue
            value = torch.empty(record["shape"], dtype=dtype)
            values[name] = f.read_into(record, value, f"buffer {name!r}") if value.numel() else value
    _mismatch(folder, problems, "initialize the model the checkpoint was saved from")
    return values


# -- phase 2 -------------------------------------------------------------------------------

def _apply(parts: CheckpointParts, folder: Path, meta: dict, verified: _Verified) -> None:
    staging = Staging()
    with TensorFiles(folder, verified.algorithm) as f:
        for group in parts.layout.groups:
            for kind, chunk in group.chunks.items():
                if kind not in FIELD_OF_KIND or chunk.tier is None:  # (None: another rank's, Stage 2)
                    continue
                field = FIELD_OF_KIND[kind]
                buffer = staging.get(chunk.dtype, chunk.capacity)
                buffer.zero_()
                for slot in group.slots:
                    record = verified.records[id(slot)]["tensors"][field]
                    into = buffer.narrow(0, slot.offset, slot.numel)
                    what = f"parameter {slot.name!r} {field}"
                    saved_dtype = DTYPES[record["dtype"]]
                    if saved_dtype == chunk.dtype:
                        f.of(record).read_into(record, into, what)
                    else:  # fp32 master -> bf16/fp16 weights (rounded as the optimizer rounds), or widened
                        into.copy_(f.of(record).read_into(record, torch.empty(slot.numel, dtype=saved_dtype), what))
                parts.manager.write_from(chunk, buffer)
            parts.manager.rebind(group.chunks[ChunkKind.PARAM])
    for slot in parts.layout.slots:
        slot.step = int(verified.records[id(slot)]["step"]) if slot.trainable else 0
    own = dict(parts.module.named_buffers())
    with torch.no_grad():
        for name, value in verified.buffers.items():
            own[name].copy_(value)
    if meta["loss_scaling"] == parts.config.uses_loss_scaling:  # fp16's scale is not bf16's
        parts.scaler.load_state_dict(meta["loss_scaler"])
    if verified.groups is not None:
        restore_groups(parts.optimizer, verified.groups)
    _set_rng_state(verified.rng, parts.manager.accelerator)
