"""Stage 2 (``shard_params: true``): a rank keeps only its own groups' parameter chunks between
steps and gathers the others before use; training matches DDP and Stage 1 exactly."""
from __future__ import annotations

import torch

import hetmem
from tests.distributed.launcher import run_ranks
from tests.distributed.test_data_parallel import assert_moved, assert_state_close
from tests.distributed.test_resume_and_failures import assert_equal_states
from tests.engine.helpers import config, tiny_gpt

STAGE2_TIGHT = "1024KiB"   # a rank holding half the parameters, half the batch: evicts every step (asserted)


def test_stage2_matches_ddp_holds_its_own_parameters_and_gathers_ahead(tmp_path):
    # clipping, accumulation (parameters dropped between micro-steps too), two param groups, an LR
    # scheduler, frozen (replicated), tied and unused parameters
    ranks = run_ranks("parity", tmp_path, steps=8, budget=STAGE2_TIGHT, clip=0.05, accumulation=2, variety=1,
                      shard=1)
    for result in ranks:
        assert_moved(result)
        assert result["global_step"] == 4 and result["norm"] > 0.05
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(result["ddp_losses"]), rtol=1e-5,
                                   atol=0)
        assert_state_close(result["state"], result["ddp_state"])
        gathers, early = result["gathers"]
        assert gathers > 0 and early > 0, f"gathers {gathers}, of them prefetched {early}"
        # between steps: the rank's own groups and the (replicated) frozen ones, nothing else
        sizes = result["param_bytes"]
        assert result["held_param_bytes"] == [sizes["owned"] + sizes["frozen"]] * 8, result["held_param_bytes"]
        trainable = sizes["all"] - sizes["frozen"]
        assert abs(sizes["owned"] - trainable / 2) <= result["largest_param_chunk"], (sizes, trainable)
        assert "broadcast" in result["comm_by_op"]
    assert ranks[0]["param_bytes"]["owned"] + ranks[1]["param_bytes"]["owned"] == trainable
    assert ranks[0]["gathers"] == ranks[1]["gathers"]   # the same plan on both ranks
    for key, value in ranks[0]["state"].items():        # engine.state_dict(): the full model on every rank
        assert torch.equal(value, ranks[1]["state"][key]), key


def test_stage2_resumes_a_stage1_checkpoint_bit_exactly_and_saves_every_weight(tmp_path):
    stage1 = run_ranks("resume", tmp_path / "run1", total=4, first=2, save=tmp_path / "one.ckpt", then=2)
    stage2 = run_ranks("resume", tmp_path / "run2", total=4, load=tmp_path / "one.ckpt",
                       save=tmp_path / "two.ckpt", then=2, shard=1)
    for result in stage2:   # the same arithmetic as Stage 1: bit for bit
        assert_equal_states(result["state_at_save"], stage1[0]["state_at_save"])
        assert_equal_states(result["state"], stage1[0]["state"])
    engine = hetmem.initialize(tiny_gpt(0), config(device_budget="2304KiB"))
    engine.load_checkpoint(tmp_path / "two.ckpt")   # every rank wrote its own groups' weights
    assert engine.global_step == 2
    assert_equal_states(engine.state_dict(), stage1[0]["state_at_save"])
    engine.close()
