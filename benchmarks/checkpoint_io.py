"""Checkpoint save and load with the optimizer state on NVMe: time, size, checksum speed.

A GPT (about 25M parameters by default) trains one step in bf16 with most of its state on
NVMe, then is saved ``--repeats`` times (the same tag: each save writes a new version and drops
the old) and loaded into a fresh engine with another chunk size (``--repeats`` times: every load
verifies every checksum first, then writes the state chunk by chunk).  The checksum speed of
both algorithms a checkpoint may use is measured on one 64 MiB buffer.  Medians are reported.

    python benchmarks/checkpoint_io.py [--dir /nvme/scratch] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: import hetmem from it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import hetmem
from hetmem.chunk_manager.states import Tier
from hetmem.corpus import load_corpus, random_batch
from hetmem.models.gpt import GPT, GPTConfig
from hetmem.units import format_bytes

MiB = 1 << 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=None, help="folder for the swap spaces and the checkpoint (default: temporary)")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--host-budget", default="128MiB")
    p.add_argument("--chunk-size", type=int, default=1 << 20, help="elements per chunk when saving (loading: twice)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def _engine(cfg: GPTConfig, folder: Path, name: str, chunk_size: int, host_budget: str):
    model = GPT(cfg)
    config = dict(device="cpu", device_budget="64MiB", host_budget=host_budget, dtype="bf16",
                  chunk_size=chunk_size, nvme_dir=str(folder / name), memory_trace=False)
    return hetmem.initialize(model, config, init_fn=model.init_weights)


def measure_checksums(nbytes: int = 64 * MiB, repeats: int = 5) -> dict:
    from hetmem.nvme._op import aio_op_if_built
    from hetmem.nvme.checksum import crc32c

    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    out = {}
    functions = {"crc32": lambda: zlib.crc32(memoryview(data.numpy()))}
    if aio_op_if_built() is not None:
        functions["crc32c"] = lambda: crc32c(data)
    for name, fn in functions.items():
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        out[name] = nbytes / statistics.median(times)
    return out


def run(args) -> dict:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, block_size=128, n_layer=args.layers, n_head=max(1, args.d_model // 64),
                    d_model=args.d_model)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        engine = _engine(cfg, folder, "swap-a", args.chunk_size, args.host_budget)
        data = load_corpus()
        x, y = random_batch(data, 2, 128, torch.Generator().manual_seed(0))
        engine.backward(engine(x, y))
        engine.step()
        on_nvme = engine.manager.bytes_on(Tier.NVME)
        saves = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            tag_dir = engine.save_checkpoint(folder / "ckpt", tag="bench")
            saves.append(time.perf_counter() - started)
        version = tag_dir / (tag_dir / "CURRENT").read_text()
        size = sum(p.stat().st_size for p in version.iterdir())
        params = engine.layout.numel
        chunk_a = engine.layout.chunk_elements
        engine.close()
        fresh = _engine(cfg, folder, "swap-b", 2 * args.chunk_size, args.host_budget)
        loads = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            fresh.load_checkpoint(folder / "ckpt")
            loads.append(time.perf_counter() - started)
        chunk_b = fresh.layout.chunk_elements
        fresh.close()
    return {"parameters": params, "state_on_nvme_bytes": on_nvme, "checkpoint_bytes": size,
            "chunk_elements_saved": chunk_a, "chunk_elements_loaded": chunk_b,
            "save_s": saves, "load_s": loads, "save_median_s": statistics.median(saves),
            "load_median_s": statistics.median(loads), "checksum_bytes_per_s": measure_checksums()}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"GPT of {result['parameters'] / 1e6:.1f}M parameters, bf16, {format_bytes(result['state_on_nvme_bytes'])} "
          f"of chunk state on NVMe; checkpoint {format_bytes(result['checkpoint_bytes'])}")
    for what in ("save", "load"):
        runs = ", ".join(f"{t:.2f}" for t in result[f"{what}_s"])
        rate = result["checkpoint_bytes"] / result[f"{what}_median_s"] / MiB
        print(f"{what}: median {result[f'{what}_median_s']:.2f} s ({rate:.0f} MiB/s)   runs: {runs} s")
    print(f"saved at chunk_size {result['chunk_elements_saved']}, loaded at {result['chunk_elements_loaded']}")
    for name, rate in result["checksum_bytes_per_s"].items():
        print(f"checksum {name}: {rate / MiB:.0f} MiB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
