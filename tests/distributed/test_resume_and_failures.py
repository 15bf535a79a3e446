"""Checkpoints across world sizes, a rank that dies, and ranks that disagree."""
from __future__ import annotations

import pytest
import torch

import hetmem
from tests.distributed.launcher import log_of, run_ranks, start, wait_all
from tests.engine.helpers import config, tiny_gpt

TIGHT = "2304KiB"


def assert_equal_states(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_checkpoints_move_between_2_ranks_1_process_and_4_ranks_bit_exactly(tmp_path):
    # 2 ranks: 3 steps, a checkpoint (each rank its own file, in parallel), 3 more steps
    first = run_ranks("resume", tmp_path / "run1", total=6, first=3, save=tmp_path / "two.ckpt", then=3)
    assert sorted(p.name for p in next((tmp_path / "two.ckpt" / "step-00000003").glob("v-*")).glob("params*")) == \
        ["params.rank-00000.bin", "params.rank-00001.bin"]
    saved = first[0]["state_at_save"]
    # 1 process loads the 2-rank checkpoint: the same weights, bit for bit; it saves again (one file)
    engine = hetmem.initialize(tiny_gpt(0), config(device_budget=TIGHT))
    engine.load_checkpoint(tmp_path / "two.ckpt")
    assert engine.global_step == 3
    assert_equal_states(engine.state_dict(), saved)
    engine.save_checkpoint(tmp_path / "one.ckpt")
    engine.close()
    # 4 ranks load that and save again (four files)
    four = run_ranks("resume", tmp_path / "run2", world=4, total=6, load=tmp_path / "one.ckpt",
                     save=tmp_path / "four.ckpt")
    for result in four:
        assert_equal_states(result["state_at_save"], saved)
    # 2 ranks load the 4-rank checkpoint and continue: the first run's last 3 steps, bit for bit
    # (so the Adam moments and step counts came through every conversion exactly too)
    second = run_ranks("resume", tmp_path / "run3", total=6, load=tmp_path / "four.ckpt", then=3)
    for rank in range(2):
        assert second[rank]["losses"] == first[rank]["losses"][3:]
        assert_equal_states(second[rank]["state"], first[rank]["state"])


@pytest.mark.parametrize("how", ["die", "stall"])
def test_a_dead_or_stalled_rank_makes_the_other_fail_with_a_clear_error(tmp_path, how):
    """Rank 1 exits (the connection closes) or sleeps (the process group's 5 s timeout runs out):
    rank 0 exits non-zero naming what it was waiting for, long before the 90 s limit here."""
    procs = start(["-m", "tests.distributed.worker", "die", str(tmp_path), "timeout=5", f"how={how}"], 2, tmp_path)
    codes, _ = wait_all(procs[:1], timeout=90)
    procs[1].kill()
    procs[1].wait()
    assert codes[0] is not None, f"rank 0 hung after rank 1 stopped ({how})"
    assert codes[0] != 0
    log = log_of(tmp_path, 0)
    assert "CollectiveError" in log and "rank 0 of 2 could not complete" in log, log[-3000:]
    assert "Another rank has probably died" in log and "timeout, 5 s" in log


def test_ranks_that_disagree_are_refused_replicas_start_equal_and_nvme_dirs_split(tmp_path):
    ranks = run_ranks("checks", tmp_path, nvme=tmp_path / "swap")
    for result in ranks:
        errors = result["errors"]
        assert "rank 1 differs from rank 0 in parameters[0][1][1]: 64 vs 96" in errors["model"], errors["model"]
        assert "rank 1 differs from rank 0 in config.gradient_clipping: None vs 2.0" in errors["config"]
        assert "world_size=2 is larger than the number of trainable chunk groups (1" in errors["world"]
        assert "lower chunk_size" in errors["world"]
    # models initialized from different seeds: each group takes its owner's values, as in DDP
    assert_equal_states(ranks[1]["initial_state"], ranks[0]["initial_state"])
    # one nvme_dir given to both ranks: a subfolder each, and NVMe changes no number
    for result in ranks:
        assert result["swap_folders"] == ["rank-00000", "rank-00001"]
        assert result["spilled"] > 0
        assert result["losses"]["nvme"] == result["losses"]["memory"]
