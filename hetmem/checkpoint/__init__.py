"""Checkpoints: the whole training state by parameter name, checksummed, saved atomically.

    ckpt/
      latest                        the tag of the newest complete checkpoint
      step-00000100/                a tag (default name: the global step)
        CURRENT                     the name of its complete version folder
        v-<id>/                     one save (format version 2, hetmem/checkpoint/format.py):
          meta.json                 config, counters, loss scale, the index of every tensor and file
          params.bin                per parameter name: fp32 weights (the master in bf16/fp16),
                                    exp_avg, exp_avg_sq; frozen parameters their weights only
          buffers.bin               the model's buffers
          rng.json                  torch (CPU and CUDA), Python and NumPy random states
          optimizer.json            hyperparameters of each of engine.optimizer.param_groups
          client_state.pt           what the caller passed, if anything
          lr_scheduler.pt           lr_scheduler.state_dict(), if one was passed

**Layout independent.**  Nothing depends on chunks: a checkpoint resumes bit-exactly under any
``chunk_size``, ``device_budget``, ``host_budget``, with NVMe on or off, and a name-indexed
file can be split across ranks later.  Per-parameter Adam step counts are saved.  fp32 and
bf16/fp16 resume into each other where the master makes it exact: a mixed-precision save holds
the fp32 master, which an fp32 engine takes as its weights; an fp32 save loaded into bf16 sets
the master to the weights and the bf16 weights to them rounded (as the optimizer rounds).
Tensors are written and read one at a time, through one staging buffer per chunk, straight
from and into wherever each chunk lives (device, host or NVMe); nothing else moves.

**Atomic in every window.**  See files.py: a save writes a new version folder, then moves the
tag's ``CURRENT``, then ``latest``, and only then deletes the version it replaced; whichever
instant it dies at, ``latest`` names a complete checkpoint, and the next save or load removes
what was left.  (Re-saving a tag therefore needs room for both versions for a moment.)
Before writing, the free space is checked against the bytes about to be written; a full disk
raises ``OSError(ENOSPC)`` naming the folder and the bytes needed, and leaves nothing behind.

**Verified before anything changes.**  Every byte of every file is under a checksum (crc32c
when hetmem's aio op is built, else zlib's crc32; meta.json carries its own crc32); loading
first checks all of them, the parameter names, shapes, trainability and dtypes, the buffers,
the accumulation boundary and the optimizer's group count, and decodes every small file;
a failure raises ``CheckpointError`` naming the file and what is wrong, with the engine
untouched.  No pickled code: tensors are raw bytes indexed by JSON, random states are JSON
numbers, and ``client_state`` / ``lr_scheduler.state_dict()`` are ``torch.save`` files loaded
with ``weights_only=True``.  A client state that ``weights_only`` would refuse (an arbitrary
object) is refused when saving, with a ``ValueError``, before anything is written.

**Optimizer groups and schedulers.**  For each of ``engine.optimizer.param_groups`` (when it has
them) every hyperparameter whose value is a number, bool, None, string or list of numbers is
saved and restored; the group count must match.  ``lr_scheduler=`` saves and restores a torch
(or Hugging Face) scheduler's ``state_dict``; a state with other keys (another kind of
scheduler) or other per-group list lengths is refused before anything changes.

Checkpoints are taken at accumulation boundaries (after ``engine.step()``), so no gradients
are saved.  Format version 1 (chunk-layout dependent) is refused with a ``CheckpointError``.
"""
from hetmem.checkpoint.files import CRASH_ENV, CRASH_EXIT_CODE, CRASH_POINTS
from hetmem.checkpoint.format import CheckpointError, CheckpointParts, TensorFile, read_meta, resolve
from hetmem.checkpoint.load import Restored, load_checkpoint
from hetmem.checkpoint.save import save_checkpoint

__all__ = ["CRASH_ENV", "CRASH_EXIT_CODE", "CRASH_POINTS", "CheckpointError", "CheckpointParts", "Restored",
           "TensorFile", "load_checkpoint", "read_meta", "resolve", "save_checkpoint"]
