"""Checkpoints saved by every rank in parallel, loadable at any world size.

The format is hetmem's (hetmem/checkpoint/, version 2, per parameter name); only the tensors
are split: rank R writes ``params.rank-<R>.bin`` with the weights (fp32 master in bf16/fp16)
and Adam moments of the groups it owns (rank 0 also the frozen groups), at the same time as
the others; each tensor record names its file.  Rank 0 does everything else exactly as a
single process does (checks, free space, the temporary version folder, buffers, random
states, optimizer groups, meta.json with every rank's records, the atomic pointer moves), so
the crash guarantees are unchanged: nothing is visible until rank 0 moves ``CURRENT``.

Loading needs nothing new: every rank reads meta.json, and fills the chunks it has from the
records by parameter name (hetmem/checkpoint/load.py opens whichever files they name).  So a
checkpoint of N ranks loads into M ranks or into one process, and a single-process one into N
ranks, bit-exactly.  The folder must be one every rank sees (a shared filesystem across
machines).  Random states are rank 0's.

Every step is agreed with small all-gathers, so a failure on any rank raises on all of them
(and leaves nothing behind) instead of leaving the others waiting.
"""
from __future__ import annotations

import logging
from pathlib import Path

from hetmem.checkpoint import files
from hetmem.checkpoint.save import _write_params, abandon_save, begin_save, check_boundary, finish_save

logger = logging.getLogger("hetmem.distributed")


def _failure(exc: BaseException | None) -> tuple[str, str] | None:
    return None if exc is None else (type(exc).__name__, str(exc))


def _raise_first(outcomes: list, what: str, rank: int, own: BaseException | None) -> None:
    """Raise on every rank when any failed: a rank's own error as it is, else one naming it."""
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if not failed:
        return
    if own is not None:
        raise own
    r, (kind, message) = failed[0]
    error = ValueError if kind in ("ValueError", "CheckpointError") else RuntimeError
    raise error(f"hetmem data parallel: {what} failed on rank {r} ({kind}: {message}); nothing was saved "
                f"(this is rank {rank})")


def save_checkpoint(dp, parts, directory, *, tag=None, client_state=None, keep=None, lr_scheduler=None) -> Path:
    comm, rank = dp.comm, dp.rank
    check_boundary(parts, "save_checkpoint")
    pending, error = None, None
    if rank == 0:
        try:
            pending = begin_save(parts, directory, tag=tag, client_state=client_state, keep=keep,
                                 lr_scheduler=lr_scheduler)
        except Exception as exc:  # noqa: BLE001 - every rank raises it below
            error = exc
    started = comm.all_gather_object((_failure(error), None if pending is None else str(pending.tmp)),
                                     "the start of the checkpoint")
    _raise_first([s[0] for s in started], "starting the checkpoint", rank, error)
    tmp = Path(started[0][1])
    groups = [g for g in parts.layout.groups if (g.trainable and dp.owns(g)) or (not g.trainable and rank == 0)]
    records, error = [], None
    try:
        records = _write_params(parts, tmp / f"params.rank-{rank:05d}.bin", files.default_algorithm(), groups)
    except Exception as exc:  # noqa: BLE001
        error = exc
    written = comm.all_gather_object((_failure(error), records), "the checkpoint's parameter files")
    failed = [w[0] for w in written]
    if any(failed) and rank == 0:
        abandon_save(pending)
    _raise_first(failed, "writing the parameter files", rank, error)
    error = None
    if rank == 0:
        order = {s.name: i for i, s in enumerate(parts.layout.slots)}
        merged = sorted((r for _, part in written for r in part), key=lambda r: order[r["name"]])
        try:
            finish_save(parts, pending, params=merged)
        except Exception as exc:  # noqa: BLE001
            error = exc
    finished = comm.all_gather_object(_failure(error), "the end of the checkpoint")
    _raise_first(finished, "finishing the checkpoint", rank, error)
    tag_dir = Path(directory) / (tag or f"step-{parts.global_step:08d}")
    logger.info("rank %d: checkpoint %s saved (%d parameters of %d in its file)", rank, tag_dir, len(records),
                len(parts.layout.slots))
    return tag_dir
