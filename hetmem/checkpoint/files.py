"""The files of a checkpoint: checksums, fsynced atomic writes, pointers, leftovers, free space.

    root/latest                       the tag of the newest complete checkpoint
    root/<tag>/CURRENT                the name of the tag's complete version folder
    root/<tag>/v-<nonce>-<pid>/       one complete save (the files of hetmem/checkpoint/format.py)
    root/<tag>/.tmp-<nonce>-<pid>/    a save being written
    root/.trash-<tag>-<nonce>-<pid>/  a pruned tag being deleted

Pointers (``latest``, ``CURRENT``) are replaced atomically (temporary file, fsync, rename,
fsync of the folder), and only after what they point to is complete on disk, so whatever
instant a save dies at, both pointers name complete checkpoints.  A save removes the
version its tag pointed to only after ``CURRENT`` and ``latest`` moved on.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import time
import zlib
from pathlib import Path

import torch

logger = logging.getLogger("hetmem.checkpoint")

LATEST = "latest"
CURRENT = "CURRENT"
VERSION_PREFIX = "v-"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"

# Crash points: the save sequence calls crash_point(name) between its steps; a test sets
# HETMEM_CHECKPOINT_CRASH_AT=name in a child process, which then exits on the spot (no cleanup,
# no flush: as a kill would), and checks what the next load and save find.
CRASH_ENV = "HETMEM_CHECKPOINT_CRASH_AT"
CRASH_EXIT_CODE = 77
CRASH_POINTS = (
    "leftovers_cleaned",        # before anything of this save exists
    "tmp_created",              # an empty .tmp folder
    "params_partial",           # params.bin half written
    "params_written",
    "buffers_written",
    "meta_written",             # the .tmp folder is complete, not yet renamed
    "version_renamed",          # a complete v-* folder that CURRENT does not name yet
    "current_tmp_written",      # CURRENT's temporary file written, not renamed
    "current_replaced",         # the tag names the new version; latest not moved yet
    "latest_tmp_written",
    "latest_replaced",          # the new checkpoint is the latest; the old version still there
    "old_version_removing",     # the replaced version half deleted
    "old_version_removed",
    "pruning",                  # an old tag renamed to .trash-*, not deleted yet
)


def crash_point(name: str) -> None:
    """Tests only: exit at once when HETMEM_CHECKPOINT_CRASH_AT names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(CRASH_EXIT_CODE)


# -- checksums -----------------------------------------------------------------------------

def default_algorithm() -> str:
    """crc32c when the aio op is built (about 12 GB/s here), else zlib's crc32 (about 2.3 GB/s)."""
    from hetmem.nvme._op import aio_op_if_built

    return "crc32c" if aio_op_if_built() is not None else "crc32"


def checksum(algorithm: str, data: torch.Tensor, crc: int = 0) -> int:
    """Checksum of a contiguous CPU tensor's bytes, extending ``crc``."""
    if algorithm == "crc32c":
        from hetmem.nvme.checksum import crc32c

        return crc32c(data, crc)  # without the op: pure Python, slow but right
    if algorithm == "crc32":
        return zlib.crc32(memoryview(data.view(torch.uint8).numpy()), crc)
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous 1-D CPU tensor seen as uint8 (no copy)."""
    return tensor.reshape(-1).view(torch.uint8)


# -- writing -------------------------------------------------------------------------------

def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_pointer(path: Path, target: str, crash_name: str) -> None:
    """Point ``path`` at ``target`` atomically (crash points ``<crash_name>_tmp_written`` and
    ``<crash_name>_replaced``)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_file(tmp, target.encode())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    crash_point(f"{crash_name}_tmp_written")
    os.replace(tmp, path)
    fsync_dir(path.parent)
    crash_point(f"{crash_name}_replaced")


def read_pointer(path: Path) -> str | None:
    """The folder name a pointer file holds; None when there is no such file."""
    try:
        name = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not name or "/" in name or name in (".", ".."):
        from hetmem.checkpoint.format import CheckpointError

        raise CheckpointError(f"{path} should hold a folder name and holds {name!r}; the file is damaged")
    return name


def unique_name() -> str:
    """<nonce>-<pid>: unique per save; the pid tells whether its writer is still running."""
    return f"{time.time_ns():x}-{os.getpid()}"


def remove_tree(path: Path, crash_name: str | None = None) -> None:
    """Delete a folder (a crash point after its first file, when named)."""
    if crash_name is not None:
        files = sorted(p for p in path.iterdir() if p.is_file())
        if files:
            files[0].unlink()
        crash_point(crash_name)
    shutil.rmtree(path, ignore_errors=True)


# -- leftovers -----------------------------------------------------------------------------

def _writer_gone(name: str) -> bool:
    """Whether the process named by a leftover's ``-<pid>`` suffix is this one or has exited."""
    pid = name.rsplit("-", 1)[-1]
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def clean_tag(tag_dir: Path) -> None:
    """Remove what interrupted saves left in a tag folder: .tmp-* folders, versions CURRENT does
    not name and pointer temporaries, each only when its writer is gone; then the folder itself
    if nothing is left (a first save of the tag that died)."""
    current = read_pointer(tag_dir / CURRENT)
    for entry in tag_dir.iterdir():
        stale_version = entry.name.startswith(VERSION_PREFIX) and entry.name != current
        if (entry.name.startswith((TMP_PREFIX, f".{CURRENT}.tmp-")) or stale_version) and _writer_gone(entry.name):
            logger.info("removing %s left by an interrupted save", entry)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    if current is None and not any(tag_dir.iterdir()):
        tag_dir.rmdir()


def is_tag_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and (
        (path / CURRENT).exists() or any(p.name.startswith((TMP_PREFIX, VERSION_PREFIX)) for p in path.iterdir()))


def clean_leftovers(root: Path) -> None:
    """Leftovers of interrupted saves under a checkpoint root (see clean_tag)."""
    for entry in root.iterdir():
        if entry.name.startswith((TRASH_PREFIX, f".{LATEST}.tmp-")):
            if _writer_gone(entry.name):
                logger.info("removing %s left by an interrupted save", entry)
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        elif is_tag_dir(entry):
            clean_tag(entry)


# -- space ---------------------------------------------------------------------------------

def no_space_error(folder: Path, need: int, free: int | None = None) -> OSError:
    from hetmem.units import format_bytes

    have = f"{format_bytes(free)} are free" if free is not None else "the disk filled up while writing"
    return OSError(errno.ENOSPC, f"not enough space in {folder} to save the checkpoint: it needs "
                                 f"{format_bytes(need)} ({need} bytes) and {have}; free some space, save to "
                                 f"another folder, or keep fewer checkpoints (keep=N)", str(folder))


def check_free_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise no_space_error(folder, need, free)


def is_out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
