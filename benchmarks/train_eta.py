"""How honest is the progress bar of `hetmem train`: its first ETA against the real time left.

Runs `python -m hetmem train ARGS` as a user would (a fresh C++ op cache with --fresh-ops, so
the build happens too), reads the progress bar from its stderr as it is drawn, and takes the
first ETA the bar shows (the time tqdm prints after `<`) and when it showed it; the real time
left is from then to the bar's last step.  The figure is ETA / real (1.0: exact; the target
is within 2x).  Machine load that changes during the run moves the real time, not the ETA:
the load average is printed with the result.

    python benchmarks/train_eta.py [--fresh-ops] [--json] [-- hetmem train args...]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BAR = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fresh-ops", action="store_true", help="an empty HETMEM_CACHE_DIR: the ops build first")
    p.add_argument("--json", action="store_true")
    p.add_argument("train_args", nargs="*", help="arguments for `hetmem train` (after --)")
    return p


def seconds(clock: str) -> int:
    total = 0
    for part in clock.split(":"):
        total = total * 60 + int(part)
    return total


def run(train_args: list[str], fresh_ops: bool) -> dict:
    env = dict(os.environ)
    if fresh_ops:
        env["HETMEM_CACHE_DIR"] = tempfile.mkdtemp(prefix="hetmem-ops-")
    out_dir = tempfile.mkdtemp(prefix="hetmem-eta-")
    command = [sys.executable, "-m", "hetmem", "train", "--out", out_dir, "--sample", "0", *train_args]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    lines: list[tuple[float, str]] = []

    def read_stdout() -> None:
        for line in proc.stdout:
            lines.append((time.perf_counter() - started, line.decode(errors="replace").rstrip()))

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    bars: list[tuple[float, int, int, str]] = []   # (seconds, step, total, eta) per redraw
    while chunk := os.read(proc.stderr.fileno(), 4096):
        now = time.perf_counter() - started
        for piece in re.split(rb"[\r\n]", chunk):
            found = BAR.search(piece.decode(errors="replace"))
            if found:
                bars.append((now, int(found.group(1)), int(found.group(2)), found.group(4)))
    proc.wait()
    reader.join()
    if proc.returncode != 0 or not bars:
        raise SystemExit(f"hetmem train failed (exit {proc.returncode}) or drew no bar: {command}")
    first = next(b for b in bars if b[3] != "?")
    end = next(b for b in bars if b[1] == b[2])
    step_at = {}
    for t, step, _, _ in bars:
        step_at.setdefault(step, t)
    steps = sorted(step_at)
    step_s = [step_at[b] - step_at[a] for a, b in zip(steps, steps[1:]) if b == a + 1]
    real = end[0] - first[0]
    return {
        "command": " ".join(["hetmem", "train", *train_args]), "fresh_ops": fresh_ops,
        "first_eta_s": seconds(first[3]), "first_eta_at_step": first[1], "first_eta_at_s": first[0],
        "real_remaining_s": real, "eta_over_real": seconds(first[3]) / real,
        "bar_shown_at_s": bars[0][0], "wall_s": time.perf_counter() - started,
        "first_step_s": step_s[0], "median_step_s": statistics.median(step_s),
        "stdout_before_bar": [text for t, text in lines if t <= bars[0][0]],
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args.train_args, args.fresh_ops)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for line in result["stdout_before_bar"]:
        print(f"  | {line}")
    print(f"bar shown after {result['bar_shown_at_s']:.1f} s; first ETA {result['first_eta_s']} s at step "
          f"{result['first_eta_at_step']}; real time left then {result['real_remaining_s']:.1f} s; "
          f"ETA / real = {result['eta_over_real']:.2f}")
    print(f"step time: first on the bar {result['first_step_s']:.3f} s, median {result['median_step_s']:.3f} s; "
          f"wall {result['wall_s']:.1f} s; load average {', '.join(f'{x:.1f}' for x in result['load_average'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
