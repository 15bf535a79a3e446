"""`hetmem export CKPT --to model.safetensors`: a plain weights file from a checkpoint.

Streams one tensor at a time from the checkpoint's chunks.bin into a safetensors file (the
format: 8-byte little-endian header length, a JSON header of name -> dtype, shape and byte
range, then the raw bytes), so exporting a model larger than host memory works.  Weights are
the full-precision ones (the fp32 master in mixed precision), under the model's own
state_dict keys (a tied weight under each name), so ``model.load_state_dict(
safetensors.torch.load_file(path))`` accepts them.  No engine and no GPU are needed.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from hetmem.checkpoint import read_chunk_bytes, read_meta, resolve

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_CHUNK_DTYPES = {"torch.float32": torch.float32, "torch.float16": torch.float16, "torch.bfloat16": torch.bfloat16}


class _ChunkReader:
    """Slices of the checkpoint's chunks, one chunk cached at a time."""

    def __init__(self, folder: Path, meta: dict):
        self.folder = folder
        self.entries = {(e["group"], e["kind"]): e for e in meta["chunks"]}
        self.handle = open(folder / "chunks.bin", "rb")
        self._cached: tuple | None = None

    def weights(self, group: int, offset: int, numel: int, shape: list[int]) -> torch.Tensor:
        entry = self.entries.get((group, "MASTER")) or self.entries[(group, "PARAM")]
        key = (group, entry["kind"])
        if self._cached is None or self._cached[0] != key:
            data = read_chunk_bytes(self.folder, entry, self.handle)
            dtype = _CHUNK_DTYPES[entry["dtype"]]
            self._cached = (key, torch.frombuffer(bytearray(data), dtype=dtype))
        flat = self._cached[1]
        return flat.narrow(0, offset, numel).view(shape).to(torch.float32)

    def close(self) -> None:
        self.handle.close()


def export_safetensors(checkpoint: str | os.PathLike, out: str | os.PathLike, *, tag: str | None = None) -> dict:
    """Write ``out`` from the checkpoint; returns {key: shape} of what was written."""
    folder = resolve(checkpoint, tag)
    meta = read_meta(folder)
    slots = {}
    for group_index, (_, _, members) in enumerate(meta["layout"]):
        for name, offset, numel, shape in members:
            slots[name] = (group_index, offset, numel, shape)
    aliases = _aliases(meta, slots)
    buffers = torch.load(folder / "buffers.pt", weights_only=True)
    header: dict[str, dict] = {}
    plan = []
    cursor = 0
    for key, kind in meta["state_dict_keys"]:
        if kind == "param":
            group, offset, numel, shape = slots[aliases[key]]
            dtype, nbytes = torch.float32, numel * 4
            plan.append((key, ("param", group, offset, numel, shape)))
        else:
            value = buffers[key]
            dtype, shape, nbytes = value.dtype, list(value.shape), value.numel() * value.element_size()
            plan.append((key, ("buffer", value)))
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
        cursor += nbytes
    header["__metadata__"] = {"format": "pt", "source": "hetmem", "checkpoint": str(folder.name),
                              "global_step": str(meta["global_step"])}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    reader = _ChunkReader(folder, meta)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for key, (what, *rest) in plan:
                if what == "param":
                    tensor = reader.weights(*rest)
                else:
                    tensor = rest[0]
                f.write(_raw(tensor))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        reader.close()
        if tmp.exists():
            tmp.unlink()
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _aliases(meta: dict, slots: dict) -> dict[str, str]:
    """state_dict key -> the slot name holding it (a tied weight's other names point to its slot)."""
    mapping = {}
    tied = meta.get("aliases", {})
    for key, kind in meta["state_dict_keys"]:
        if kind == "param":
            mapping[key] = key if key in slots else tied[key]
    return mapping


def _raw(tensor: torch.Tensor) -> bytes:
    t = tensor.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return np.ascontiguousarray(t.numpy()).tobytes()
