"""`hetmem env`: the environment report (see hetmem/env.py)."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=None,
                        help="folder to probe the IO backends and O_DIRECT on (default: the temp folder); "
                             "give your nvme_dir")
    parser.add_argument("--build", action="store_true", help="build the C++ ops now if they are not built")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from hetmem.env import collect, format_text

    report = collect(io_dir=args.dir, build=args.build)
    print(json.dumps(report, indent=2) if args.json else format_text(report))
    return 0
