"""How fast the disk moves a training step's own IO while the CPU computes beside it.

``benchmarks/nvme_train.py`` measures the step's disk time by replaying the step's requests
alone (hetmem/nvme/replay.py).  Inside training the disk works beside forward, backward and the
Adam kernels; where the compute device is this CPU they share its cores and its memory
bandwidth with the IO threads and the swap checksums.  This benchmark asks what that costs the
disk itself: one steady NVMe optimizer step of the GPT of ``nvme_train.py`` is recorded (bf16,
``overlap_step`` off), then its requests are replayed alone and beside a *load*, a child
process that computes through the whole replay:

  adam     hetmem's fused Adam kernel over 4M-element fp32 states in a loop (memory-bound,
           what the step itself runs beside its IO)
  matmul   a 1024x1024 @ 1024x4096 float32 matmul in a loop on every core (compute-bound, like
           forward and backward)

each at niceness 0 (competing equally with the IO threads) and 19 (yielding to them).  Rounds
run every load once, in an order reversed each round, with a replay alone in every round (each
measurement replays the step as often as fills a second); the
figure per load is the median over rounds of its replay rate over that round's alone rate
(paired), and the load's CPU use (cores: its CPU seconds over the measurement's wall time, the
replays' setup included) shows that it ran.  A load starts when its child process has set up and
run one iteration; a load that stops before the end of its measurement is an error.

    python benchmarks/disk_beside_compute.py DIR [--rounds 3] [--loads adam/0,adam/19,...] [--json]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

if __name__ == "__main__" and not __package__:  # run as a file: use this checkout's hetmem
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = str(Path(__file__).resolve().parent.parent)
# the child processes' code: each sets its niceness, dies with its parent (Linux), sets up, runs
# one iteration, prints "ready" and computes until killed
PRELUDE = ("import ctypes, os, sys\n"
           "os.nice({nice})\n"
           "try:\n    ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL\n"
           "except (OSError, AttributeError):\n    pass\n"
           "sys.path.insert(0, {repo!r})\n")
LOAD_CODE = {
    "adam": ("import torch\nfrom hetmem.ops.adam import adam_step\n"
             "n = 4 << 20\nw, g, m, v = (torch.randn(n) for _ in range(4))\n"
             "g = g.bfloat16(); out = torch.empty(n, dtype=torch.bfloat16)\n"
             "def work():\n"
             "    adam_step(w, g, m, v, step=1, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,\n"
             "              decoupled=True, grad_scale=1.0, out=out, bias_correction=True)\n"),
    "matmul": ("import torch\ntorch.set_num_threads(os.cpu_count() or 1)\n"
               "a, b = torch.randn(1024, 1024), torch.randn(1024, 4096)\n"
               "def work():\n    a @ b\n"),
}
LOOP = "work()\nprint('ready', flush=True)\nwhile True:\n    work()\n"
NICE = (0, 19)
MIN_SECONDS = 1.0  # each measurement replays the step at least this long
START_TIMEOUT_S = 60.0  # a load's setup (torch's import) and first iteration
DEFAULT_LOADS = [f"{kind}/{nice}" for kind in LOAD_CODE for nice in NICE]


def parse_loads(text: str) -> list[str]:
    loads = [item.strip() for item in text.split(",") if item.strip()]
    for load in loads:
        kind, _, nice = load.partition("/")
        if kind not in LOAD_CODE or nice not in {str(n) for n in NICE}:
            raise argparse.ArgumentTypeError(
                f"load {load!r} is not one of {', '.join(DEFAULT_LOADS)}; give them comma-separated")
    if not loads:
        raise argparse.ArgumentTypeError(f"no load given; choose from {', '.join(DEFAULT_LOADS)}")
    twice = sorted({load for load in loads if loads.count(load) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"load {twice[0]!r} is given twice; give each load once")
    return loads


def parse_args(argv):
    from hetmem.benchmarks.nvme_train import add_model_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir", help="a folder on the disk to test (the swap and replay files are removed after)")
    add_model_arguments(p, None)  # nvme_train.py's GPT, batch and budgets
    p.add_argument("--rounds", type=int, default=3, help="passes over the loads, each with a replay alone")
    p.add_argument("--loads", type=parse_loads, default=DEFAULT_LOADS,
                   help=f"comma-separated, from {','.join(DEFAULT_LOADS)} (kind/niceness)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if min(args.rounds, args.d_model, args.layers, args.block_size, args.batch_size) < 1:
        p.error("--rounds, --d-model, --layers, --block-size and --batch-size must be >= 1")
    if args.d_model % max(1, args.d_model // 64):  # the GPT's heads are d_model // 64 wide
        p.error(f"--d-model {args.d_model} must be below 128 or a multiple of its {args.d_model // 64} heads "
                f"(d_model // 64); try {args.d_model // 64 * 64}")
    from hetmem._core.units import parse_size

    for key in ("device_budget", "host_budget"):
        try:
            parse_size(getattr(args, key), key="--" + key.replace("_", "-"))
        except ValueError as exc:
            p.error(str(exc))
    return args


def record_step(args, folder: str):
    """One steady synchronous optimizer step's swap requests (after a warm-up step), and the
    engine's IO settings."""
    import torch

    import hetmem
    from hetmem.corpus import load_corpus, random_batch
    from hetmem.benchmarks.nvme_train import gpt_config
    from hetmem.models.gpt import GPT

    cfg = gpt_config(args)
    config = hetmem.Config(device="cpu", device_budget=args.device_budget, host_budget=args.host_budget,
                           nvme_dir=folder, dtype=args.dtype, memory_trace=False, overlap_step=False,
                           optimizer=hetmem.AdamConfig(lr=1e-4, weight_decay=0.1))
    data, gen = load_corpus(), torch.Generator().manual_seed(0)
    with torch.device("meta"):
        model = GPT(cfg)
    engine = hetmem.initialize(model, config, init_fn=model.init_weights)
    try:
        for step in range(2):
            engine.backward(engine(*random_batch(data, args.batch_size, args.block_size, gen)))
            if step == 0:
                engine.step()
                continue
            with engine.manager.nvme.swap.recording() as recorder:
                engine.step()
        buffer_kind = engine.manager.nvme.buffer_stats()["kind"]
    except BaseException:
        try:
            engine.close(keep_weights=False)
        except OSError as exc:  # a transfer the error (or Ctrl-C) cut short: the first error is the one raised
            logging.getLogger("hetmem.benchmarks").debug("closing the engine after an error: %s", exc)
        raise
    engine.close(keep_weights=False)
    if not recorder.records:
        raise ValueError(f"the step moved nothing to or from NVMe at host_budget={args.host_budget}: the state "
                         f"fits host memory; lower --host-budget so that the step uses the disk")
    return list(recorder.records), config, buffer_kind


class Load:
    """A child process computing ``kind`` at ``nice`` until stopped; its CPU seconds are read."""

    def __init__(self, kind: str, nice: int):
        self.kind = kind
        code = "\n".join([PRELUDE.format(nice=nice, repo=REPO), LOAD_CODE[kind], LOOP])
        self.process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
        try:
            self._wait_started(kind)
        except BaseException:  # an error or an interrupt while it starts: the child goes too
            self.stop()
            raise

    def _wait_started(self, kind: str) -> None:
        """Until the child prints "ready" (set up, one iteration done: computing from now on)."""
        ready, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT_S)
        line = self.process.stdout.readline() if ready else b""
        if line.strip() == b"ready":
            return
        if self.process.poll() is None and not ready:
            raise RuntimeError(f"the {kind!r} load did not start computing within {START_TIMEOUT_S:.0f} s")
        self.process.wait()
        raise RuntimeError(f"the {kind!r} load exited at once ({self._last_error()}); run "
                           f"benchmarks/disk_beside_compute.py from a checkout whose hetmem imports")

    def _last_error(self) -> str:
        lines = self.process.stderr.read().decode(errors="replace").strip().splitlines() or ["no output"]
        return lines[-1][-300:]

    def check_alive(self) -> None:
        """Raise if the child stopped computing before it was stopped (its figure would be wrong)."""
        if self.process.poll() is not None:
            raise RuntimeError(f"the {self.kind!r} load exited during its measurement (exit status "
                               f"{self.process.returncode}: {self._last_error()}); its figure would not be "
                               f"beside compute, so none is given")

    def cpu_s(self) -> float:
        """The child's CPU seconds so far (0 once it is gone)."""
        try:
            times = psutil.Process(self.process.pid).cpu_times()
        except psutil.NoSuchProcess:
            return 0.0
        return times.user + times.system

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()
        self.process.stderr.close()


def measure(args, progress=None) -> dict:
    from hetmem.nvme.replay import replay

    if not os.path.isdir(args.dir):
        raise ValueError(f"{args.dir!r} is not a folder; give an existing folder on the disk to test")
    folder = tempfile.mkdtemp(prefix="disk-beside-compute-", dir=args.dir)  # removed at the end: only ours
    try:
        records, config, buffer_kind = record_step(args, os.path.join(folder, "swap"))

        def replay_for(seconds: float) -> dict:
            """The step replayed as often as needed to fill ``seconds`` (a small model's step is too
            short to time, or to read a load's CPU time over): its total time and rate."""
            total_s = total_bytes = count = 0
            out = {}
            while total_s < seconds:
                out = replay(records, folder, backend=config.nvme_backend, block_size=config.nvme_block_size,
                             queue_depth=config.nvme_queue_depth, threads=config.nvme_threads,
                             lock=config.nvme_lock_buffers)
                total_s, total_bytes, count = total_s + out["seconds"], total_bytes + out["bytes"], count + 1
            backends.add(out["backend"])
            kinds.add(out["buffer_kind"])
            return {"seconds": total_s, "bytes_per_s": total_bytes / total_s, "replays": count}

        backends: set[str] = set()  # the backend the replays resolved "auto" to
        kinds: set[str] = set()     # the buffers the replays used
        order = ["none", *args.loads]
        rows = {name: [] for name in order}
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                load = None if name == "none" else Load(name.split("/")[0], int(name.split("/")[1]))
                try:
                    before, started = (load.cpu_s() if load else 0.0), time.perf_counter()
                    out = replay_for(MIN_SECONDS)
                    # the load's CPU seconds over the wall time of the measurement (the replays and
                    # the setup of each: buffers, the scratch file's layout)
                    cores = (load.cpu_s() - before) / (time.perf_counter() - started) if load else 0.0
                    if load:
                        load.check_alive()
                finally:
                    if load:
                        load.stop()
                rows[name].append({"round": r, "seconds": out["seconds"], "replays": out["replays"],
                                   "bytes_per_s": out["bytes_per_s"], "load_cores": cores})
                if progress:
                    progress(f"round {r + 1}: {name}: {out['bytes_per_s'] / 1e9:.2f} GB/s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    alone = {row["round"]: row["bytes_per_s"] for row in rows["none"]}
    loads = {}
    for name in order:
        ratios = [row["bytes_per_s"] / alone[row["round"]] for row in rows[name]]
        loads[name] = {"bytes_per_s": statistics.median(row["bytes_per_s"] for row in rows[name]),
                       "vs_alone": statistics.median(ratios), "vs_alone_range": [min(ratios), max(ratios)],
                       "load_cores": statistics.median(row["load_cores"] for row in rows[name]), "rows": rows[name]}
    return {"benchmark": "disk_beside_compute", "cores": os.cpu_count(),
            "step": {"requests": len(records), "bytes": sum(r.nbytes for r in records),
                     "buffer_kind": ", ".join(sorted(kinds)), "engine_buffer_kind": buffer_kind,
                     "backend": ", ".join(sorted(backends)),
                     "model": {"d_model": args.d_model, "layers": args.layers, "dtype": args.dtype,
                               "host_budget": args.host_budget}},
            "rounds": args.rounds, "loads": loads}


def table(result: dict) -> str:
    step = result["step"]
    lines = [f"one steady optimizer step's own IO: {step['requests']} requests, {step['bytes'] / 1e9:.2f} GB "
             f"[{step['buffer_kind']}, {step['backend']}], replayed alone and beside each load, {result['rounds']} rounds "
             f"({result['cores']} cores)",
             f"{'load':<12} {'GB/s (median)':>13} {'/ alone (paired median, range)':>32} {'load on cores':>14}"]
    for name, row in result["loads"].items():
        low, high = row["vs_alone_range"]
        paired = "" if name == "none" else f"{row['vs_alone']:.3f} ({low:.3f}-{high:.3f})"
        cores = "" if name == "none" else f"{row['load_cores']:.2f}"
        lines.append(f"{name:<12} {row['bytes_per_s'] / 1e9:>13.2f} {paired:>32} {cores:>14}")
    return "\n".join(lines)


class _Terminated(Exception):
    """SIGTERM or SIGHUP: raised in the main thread so that the loads and files are cleaned up."""


def _terminate(signum, frame):
    raise _Terminated(signal.Signals(signum).name)


def main(argv=None) -> int:
    args = parse_args(argv)
    progress = None if args.json else (lambda msg: print("  " + msg, file=sys.stderr, flush=True))
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        result = measure(args, progress)
    except (ValueError, RuntimeError) as exc:
        print(f"disk_beside_compute: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the folder: full, read-only
        print(f"disk_beside_compute: {args.dir!r} cannot hold the swap and replay files ({exc}); give a "
              f"writable folder on the disk to test", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Terminated) as exc:
        why = str(exc) or "Ctrl-C"
        print(f"disk_beside_compute: stopped by {why}; its loads were stopped and its files removed", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
