"""Run tests/distributed/worker.py as N gloo ranks (subprocesses, as torchrun would), with a
timeout that kills every rank, so a hang fails the test instead of blocking CI."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(rank: int, world: int, port: int, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in extra.items()}}


def start(args: list[str], world: int, out: Path, **extra) -> list[subprocess.Popen]:
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world):
        log = open(out / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env_for(rank, world, port, **extra),
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> tuple[list[int | None], float]:
    """Exit codes (None: killed at the timeout) and the seconds it took."""
    started = time.monotonic()
    codes: list[int | None] = [None] * len(procs)
    while time.monotonic() - started < timeout and any(c is None for c in codes):
        for i, p in enumerate(procs):
            if codes[i] is None:
                codes[i] = p.poll()
        time.sleep(0.05)
    for i, p in enumerate(procs):
        if codes[i] is None:
            p.kill()
            p.wait()
    return codes, time.monotonic() - started


def log_of(out: Path, rank: int) -> str:
    return (out / f"rank{rank}.log").read_text()


def run_ranks(scenario: str, out: Path, world: int = 2, timeout: float = 120, **options) -> list[dict]:
    """Run ``scenario`` on ``world`` ranks; every rank must exit 0; their results, by rank."""
    args = ["-m", "tests.distributed.worker", scenario, str(out)] + [f"{k}={v}" for k, v in options.items()]
    codes, _ = wait_all(start(args, world, out), timeout)
    for rank, code in enumerate(codes):
        assert code == 0, f"rank {rank} exited with {code} (None: killed after {timeout} s):\n{log_of(out, rank)[-4000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
