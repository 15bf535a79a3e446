"""Data parallel over 2 gloo ranks: each rank half of every batch, chunks evicted every step;
the same losses and weights as one process on the whole batch and as DDP + torch AdamW."""
from __future__ import annotations

import pytest
import torch

import hetmem
from hetmem.distributed import optimizer_state_bytes
from tests.distributed.launcher import run_ranks
from tests.engine.helpers import batches, config, tiny_gpt, train_engine

TIGHT = "2304KiB"          # one process, the whole batch of 4: evicts every step (tests/engine/test_parity.py)
RANK_TIGHT = "1536KiB"     # a rank, half the batch: evicts every step too (asserted)



def single_process(steps: int, **overrides):
    engine = hetmem.initialize(tiny_gpt(0, bias=True), config(device_budget=TIGHT, **overrides))
    losses = train_engine(engine, batches(steps, batch_size=4, seed=0))
    return engine, losses


def assert_moved(result):
    assert result["evictions"] and all(result["evictions"]), f"steps without evictions: {result['evictions']}"
    assert all(result["fetches"]), f"steps without fetches: {result['fetches']}"


def assert_state_close(got: dict, expected: dict, rtol=1e-5, atol=1e-7):
    assert list(got) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=rtol, atol=atol, msg=key)


def assert_norm_close(got: dict, expected: dict, rtol=1e-5):
    """Per tensor, ||got - expected|| <= rtol * ||expected|| (NaN fails).  Against one process on the
    whole batch the mean of two half-batch gradients differs in its last bits, which Adam turns
    into ~1e-6 absolute differences where a gradient is near zero: DDP itself differs from one
    process that much element by element, so elements are compared with DDP, tensors with this."""
    assert list(got) == list(expected)
    for key, value in expected.items():
        rel = ((got[key].double() - value.double()).norm() / value.double().norm().clamp_min(1e-12)).item()
        assert rel <= rtol, f"{key}: relative difference {rel}"


def check_optimizer_state_split(ranks, engine):
    """Each rank holds 1/N of the single process's optimizer state, within one group."""
    total = optimizer_state_bytes(engine.manager)
    owners = ranks[0]["owners"]
    assert owners == ranks[1]["owners"] and set(owners.values()) == {0, 1}
    largest = 2 * max(ranks[0]["group_bytes"].values())   # EXP_AVG + EXP_AVG_SQ of the largest group (fp32)
    assert ranks[0]["optimizer_state_bytes"] + ranks[1]["optimizer_state_bytes"] == total
    for result in ranks:
        assert abs(result["optimizer_state_bytes"] - total / 2) <= largest, (result["optimizer_state_bytes"], total)
    assert "use engine.save_checkpoint(DIR) on every rank" in ranks[0]["optimizer_error"]
    summary = ranks[0]["summary"]
    assert summary["world_size"] == 2 and summary["optimizer_state_bytes_total"] == total
    assert [r["rank"] for r in summary["ranks"]] == [0, 1] and summary["within_budget"]


def test_fp32_parity_with_one_process_and_ddp_and_state_split(tmp_path):
    ranks = run_ranks("parity", tmp_path, steps=8, budget=RANK_TIGHT)
    engine, single_losses = single_process(8)
    for rank, result in enumerate(ranks):
        assert_moved(result)
        assert result["report_meta"] == {"rank": rank, "world_size": 2,
                                         "owned_groups": sorted(i for i, r in result["owners"].items() if r == rank)}
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(single_losses), rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(result["ddp_losses"]), rtol=1e-5,
                                   atol=0)
        assert_norm_close(result["state"], engine.state_dict())
        assert_state_close(result["state"], result["ddp_state"])
    check_optimizer_state_split(ranks, engine)
    # the replicas are identical, bit for bit, and module.state_dict() is the full model too (fp32)
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
        assert torch.equal(value, ranks[1]["module_state"][key]), key


def test_clipping_accumulation_groups_scheduler_frozen_tied_unused_match_ddp(tmp_path):
    ranks = run_ranks("parity", tmp_path, steps=8, budget=RANK_TIGHT, clip=0.05, accumulation=2, variety=1)
    for result in ranks:
        assert result["global_step"] == 4
        assert result["lrs"] == [1e-3 / 3, 3e-3 / 3], "the LR scheduler did not run"
        assert "head.weight" in result["state"] and "unused.weight" in result["state"]
        assert result["norm"] > 0.05, "clipping was not active"
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(result["ddp_losses"]), rtol=1e-5,
                                   atol=0)
        assert_state_close(result["state"], result["ddp_state"])


def test_bf16_ranks_stay_identical_and_follow_fp32(tmp_path):
    ranks = run_ranks("parity", tmp_path, steps=6, budget=RANK_TIGHT, dtype="bf16", clip=1.0)
    fp32 = torch.tensor(ranks[0]["ddp_losses"])
    for result in ranks:
        low = torch.tensor(result["losses"])
        rel = ((low - fp32).abs() / fp32).max().item()
        assert rel < 0.02, f"bf16 left the fp32 DDP loss curve by {rel:.2%}"
    for key, value in ranks[0]["state"].items():   # fp32 masters gathered: equal on both ranks
        assert value.dtype == torch.float32 and torch.equal(value, ranks[1]["state"][key]), key


def test_ranks_agree_to_skip_a_nonfinite_step_and_refuse_diverging_schedules(tmp_path):
    ranks = run_ranks("agreement", tmp_path)
    for dtype in ("fp32", "fp16"):
        for rank, result in enumerate(ranks):
            got = result[dtype]
            assert got["skipped"][1] and not got["skipped"][2], (dtype, rank, got["skipped"])
            if dtype == "fp16":
                assert got["scales"][1] < got["scales"][0], "the loss scale did not drop"
            for key, value in got["states"][0].items():   # the skipped step changed nothing
                assert torch.equal(got["states"][1][key], value), (dtype, rank, key)
        for key, value in ranks[0][dtype]["states"][2].items():   # and the ranks went on together
            assert torch.equal(ranks[1][dtype]["states"][2][key], value), (dtype, key)
        assert ranks[0][dtype]["scales"] == ranks[1][dtype]["scales"]
    for result in ranks:   # modules run in another order on rank 1: stopped on both ranks
        assert result["diverge"] is not None and result["diverge"].startswith("ScheduleDivergence"), result["diverge"]
        assert "rank(s) [1] differs from rank 0's" in result["diverge"]
