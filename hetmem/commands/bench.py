"""`hetmem bench NAME [ARGS...]`: runs benchmarks/NAME with the remaining arguments.

The benchmarks live in the repository's benchmarks/ folder (installed as
hetmem.benchmarks); each defines ``main(argv) -> int`` and accepts ``--help``.
"""
from __future__ import annotations

import argparse
import importlib

# `hetmem bench NAME` -> module under hetmem.benchmarks
BENCHMARKS = {
    "adam": "cpu_adam",
    "grad-norm": "grad_norm",
    "nvme": "nvme_swap",
    "scale": "train_scale",
    "throughput": "train_throughput",
    "trace": "trace_overhead",
    "activations": "activation_offload",
    "nvme-train": "nvme_train",
    "nvme-pipeline": "nvme_pipeline_plan",
    "vs-deepspeed": "nvme_vs_deepspeed",
    "memory": "memory_overhead",
    "gpu": "gpu_acceptance",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark (try --help)")


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"hetmem.benchmarks.{BENCHMARKS[args.name]}")
    return int(module.main(args.args) or 0)
