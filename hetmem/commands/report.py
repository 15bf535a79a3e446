"""`hetmem report RUN_DIR`: render a saved run again, without training again.

Reads RUN_DIR/trace.json (or a trace file), prints the text table and writes report.txt,
summary.json, memory.png (with matplotlib), report.html and trace.chrome.json into --out
(default: RUN_DIR).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="the folder of a run (it holds trace.json), or a trace.json file")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for the rendered files (default: RUN_DIR, or the trace file's folder)")
    parser.add_argument("--step", type=int, default=None, metavar="N",
                        help="the iteration to show (default: the last steady step, after the warm-up)")


def run(args: argparse.Namespace) -> int:
    from hetmem.report import MemoryReport
    from hetmem.report.plot import MISSING_MATPLOTLIB, has_matplotlib

    source = Path(args.run_dir)
    try:
        report = MemoryReport.load(source)
        text = report.to_text(args.step)
        out = Path(args.out) if args.out else (source if source.is_dir() else source.parent)
        paths = report.render_all(out, step=args.step)
    except (OSError, ValueError) as error:
        print(f"hetmem report: error: {error}", file=sys.stderr)
        return 1
    print(text)
    print("wrote:")
    for kind, path in paths.items():
        print(f"  {kind:<13} {path}")
    if "png" not in paths:
        reason = MISSING_MATPLOTLIB if not has_matplotlib() else "no moments recorded to plot"
        print(f"  (no memory.png: {reason})")
    return 0
