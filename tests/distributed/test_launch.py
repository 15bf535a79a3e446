"""torchrun with a script that adds only the process group (README), and `hetmem train --nproc`."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.distributed.launcher import ROOT, env_for

EXAMPLE = ROOT / "examples" / "data_parallel.py"


def test_torchrun_runs_the_readme_example_unchanged():
    code = EXAMPLE.read_text()
    body = code[code.index("import torch"):]
    assert body in (ROOT / "README.md").read_text(), "README's data-parallel example differs from examples/data_parallel.py"
    env = {k: v for k, v in env_for(0, 1, 0).items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(EXAMPLE)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "trained 5 steps on 2 ranks" in done.stdout


def test_hetmem_train_nproc_launches_ranks_each_with_its_report(tmp_path):
    env = {k: v for k, v in env_for(0, 1, 0).items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "hetmem", "train", "--nproc", "2", "--steps", "2", "--d-model", "64",
                           "--layers", "2", "--heads", "4", "--block-size", "32", "--batch-size", "4", "--device",
                           "cpu", "--device-budget", "4MiB", "--dtype", "fp32", "--sample", "0", "--no-progress",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "data parallel: 2 ranks; optimizer state per rank" in done.stdout
    assert done.stdout.count("final loss") == 1, "only rank 0 prints"
    for rank in range(2):
        trace = json.loads((out / f"rank-{rank}" / "trace.json").read_text())
        assert trace["meta"]["data_parallel"]["rank"] == rank
        assert trace["meta"]["data_parallel"]["world_size"] == 2
