"""`hetmem profile`: one traced step of a model without offload; what it needs on a device."""
from __future__ import annotations

import argparse
import importlib
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="MODULE:FUNCTION returning (model, batch); default: the GPT of `hetmem train`")
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _builtin(args):
    import torch

    from hetmem.corpus import load_corpus, random_batch
    from hetmem.models.gpt import GPT, GPTConfig

    cfg = GPTConfig(block_size=args.block_size, n_layer=args.layers, n_head=args.heads, d_model=args.d_model,
                    checkpoint=not args.no_checkpointing)
    torch.manual_seed(0)
    x, y = random_batch(load_corpus(), args.batch_size, args.block_size, torch.Generator().manual_seed(0))
    return GPT(cfg), (x, y)


def run(args: argparse.Namespace) -> int:
    from hetmem.profiler import profile

    if args.model:
        module_name, _, function = args.model.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), function or "build")
        except (ImportError, AttributeError) as exc:
            print(f"hetmem profile: error: cannot load {args.model!r}: {exc}; give MODULE:FUNCTION",
                  file=sys.stderr)
            return 2
        model, batch = factory()
    else:
        model, batch = _builtin(args)
    result = profile(model, batch, dtype=args.dtype, device=args.device)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.to_text())
    return 0
