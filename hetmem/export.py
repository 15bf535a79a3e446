"""`hetmem export CKPT --to model.safetensors`: a plain weights file from a checkpoint.

Streams one tensor at a time from the checkpoint's params.bin (each checksum-verified as it is
read) into a safetensors file (the format: 8-byte little-endian header length, a JSON header of
name -> dtype, shape and byte range, then the raw bytes), so exporting a model larger than host
memory works.  Weights are the full-precision ones (the fp32 master in mixed precision; frozen
parameters widened to fp32), under the model's own state_dict keys (a tied weight under each
name), so ``model.load_state_dict(safetensors.torch.load_file(path))`` accepts them.  No engine
and no GPU are needed.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from hetmem.checkpoint import CheckpointError, TensorFile, read_meta, resolve
from hetmem.checkpoint.format import BUFFERS, DTYPES, PARAMS

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def export_safetensors(checkpoint: str | os.PathLike, out: str | os.PathLike, *, tag: str | None = None) -> dict:
    """Write ``out`` from the checkpoint; returns {key: shape} of what was written."""
    folder = resolve(checkpoint, tag)
    meta = read_meta(folder)
    params = {alias: p for p in meta["params"] for alias in p["aliases"]}
    buffers = {b["name"]: b for b in meta["buffers"]}
    header: dict[str, dict] = {}
    plan = []
    cursor = 0
    for key, kind in meta["state_dict_keys"]:
        if kind == "param":
            if key not in params:
                raise CheckpointError(f"{folder}: state_dict key {key!r} has no parameter record")
            record = params[key]
            dtype, shape, source = torch.float32, record["shape"], (PARAMS, record["tensors"]["weights"])
        else:
            if key not in buffers:
                raise CheckpointError(f"{folder}: state_dict key {key!r} has no buffer record")
            record = buffers[key]
            dtype, shape, source = DTYPES[record["dtype"]], record["shape"], (BUFFERS, record)
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        plan.append((key, shape, source))
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
        cursor += nbytes
    header["__metadata__"] = {"format": "pt", "source": "hetmem", "checkpoint": str(folder.parent.name),
                              "global_step": str(meta["global_step"])}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    readers = {name: TensorFile(folder, name, meta["checksum"]) for name in (PARAMS, BUFFERS)}
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for key, shape, (file_name, record) in plan:
                value = torch.empty(shape, dtype=DTYPES[record["dtype"]])
                if value.numel():
                    readers[file_name].read_into(record, value, f"{key!r}")
                f.write(_raw(value.to(torch.float32) if file_name == PARAMS else value))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        for reader in readers.values():
            reader.close()
        if tmp.exists():
            tmp.unlink()
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _raw(tensor: torch.Tensor) -> bytes:
    t = tensor.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return np.ascontiguousarray(t.numpy()).tobytes()
