"""`hetmem export CKPT --to model.safetensors`: a plain weights file from a checkpoint."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint folder (or its parent with a 'latest' file)")
    parser.add_argument("--to", required=True, help="the .safetensors file to write")
    parser.add_argument("--tag", default=None, help="a checkpoint tag under CHECKPOINT (default: latest)")


def run(args: argparse.Namespace) -> int:
    from hetmem.checkpoint import CheckpointError
    from hetmem.export import export_safetensors

    try:
        written = export_safetensors(args.checkpoint, args.to, tag=args.tag)
    except (CheckpointError, OSError) as exc:
        print(f"hetmem export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} tensors to {args.to}")
    return 0
