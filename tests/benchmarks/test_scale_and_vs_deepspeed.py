"""train_scale's children under the limit runner on a tiny model; nvme_vs_deepspeed's config and arithmetic."""
from __future__ import annotations

import pytest

from hetmem.benchmarks import memlimit, nvme_vs_deepspeed, train_scale

SPEC = {"dtype": "bf16", "block_size": 32, "batch_size": 1, "steps": 2, "device_budget": "4MiB",
        "host_budget": "auto", "nvme_dir": None}


@pytest.mark.parametrize("side", ["plain", "hetmem"])
def test_each_side_trains_a_tiny_model_in_a_limited_child(side):
    shape = [64, 2]
    result = memlimit.run_limited(train_scale.THIS, f"train_{side}", {"shape": shape, "spec": SPEC},
                                  limit_bytes=4 << 30, timeout_s=240)
    assert result["ok"], result
    assert result["parameters"] == train_scale.gpt(*shape, SPEC["block_size"]).parameters
    assert len(result["losses"]) == 2 and all(loss == loss for loss in result["losses"])  # NaN fails
    assert result["peak_rss_bytes"] > 0
    if side == "hetmem":
        b = result["rss_breakdown_at_end"]
        assert b["baseline"] + b["accounted"] + b["unaccounted"] == b["rss"]
        assert b["parts"]["chunks.param"] > 0 and result["within_device_budget"]


def test_deepspeed_config_uses_hetmems_io_settings():
    spec = {"dir": "/x", "batch_size": 2, "block_size_io": 1 << 20, "queue_depth": 16, "threads": 1,
            "sub_group_size": 2e7, "offload_param": "none"}
    config = nvme_vs_deepspeed.deepspeed_config(spec)
    assert config["aio"]["block_size"] == 1 << 20 and config["aio"]["queue_depth"] == 16
    assert config["aio"]["intra_op_parallelism"] == 1
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["sub_group_size"] == 20_000_000
    assert zero["offload_optimizer"]["device"] == "nvme" and "offload_param" not in zero
    nvme = nvme_vs_deepspeed.deepspeed_config({**spec, "offload_param": "nvme"})["zero_optimization"]
    assert nvme["offload_param"]["device"] == "nvme"


def _run(rnd, steps, disk, rss):
    return {"ok": True, "round": rnd, "parameters": 10, "step_seconds": steps, "losses": [1.0],
            "disk_read_per_step": disk / 2, "disk_write_per_step": disk / 2, "peak_rss_bytes": rss}


def test_summary_and_ratios_skip_the_warmup_step():
    runs = {"hetmem": [_run(0, [99.0, 2.0, 2.0], 8.0, 100), _run(1, [99.0, 4.0, 4.0], 8.0, 100)],
            "deepspeed": [_run(0, [99.0, 4.0, 4.0], 10.0, 400), _run(1, [99.0, 4.0, 4.0], 10.0, 400)]}
    h, d = (nvme_vs_deepspeed.summarize(runs[n]) for n in ("hetmem", "deepspeed"))
    assert h["s_per_step_median"] == 3.0 and d["s_per_step_median"] == 4.0
    r = nvme_vs_deepspeed.ratios(h, d, runs)
    assert r["s_per_step"] == 0.75 and r["s_per_step_per_round"] == [0.5, 1.0]
    assert r["disk_bytes_per_step"] == 0.8 and r["peak_rss"] == 0.25
    assert r["target_met"]
    assert not nvme_vs_deepspeed.summarize([{"ok": False, "error": "x"}])["ok"]


def test_the_release_comparison_pairs_runs_by_round():
    runs = {"hetmem": [_run(0, [99.0, 2.0, 2.0], 8.0, 90), _run(1, [99.0, 3.0, 3.0], 8.0, 80)],
            "hetmem_kept": [_run(1, [99.0, 3.0, 3.0], 8.0, 100), _run(0, [99.0, 4.0, 4.0], 8.0, 100),
                            {"ok": False, "round": 2}]}
    e = nvme_vs_deepspeed.release_effect(runs)
    assert e["s_per_step_per_round"] == [0.5, 1.0] and e["s_per_step_median"] == 0.75
    assert e["peak_rss_per_round"] == [0.9, 0.8] and e["peak_rss_saved_bytes_per_round"] == [10, 20]
    unpaired = {"hetmem": [_run(0, [99.0, 2.0], 8.0, 90)], "hetmem_kept": [_run(1, [99.0, 3.0], 8.0, 100)]}
    assert nvme_vs_deepspeed.release_effect(unpaired) is None


def test_the_accelerator_path_runs_on_the_simulated_device(monkeypatch):
    monkeypatch.setenv("HETMEM_DEVICE", "sim")
    monkeypatch.setattr(train_scale, "ACCELERATOR_LADDER", [(64, 2)])
    args = train_scale.build_parser().parse_args(["--device-budget", "16MiB", "--block-size", "32", "--steps", "2"])
    result = train_scale.measure(args)
    assert result["measurement"].startswith("device memory: 16MiB")
    assert [r["ok"] for r in result["plain"] + result["hetmem"]] == [True, True]
    assert result["largest"]["hetmem"] == result["largest"]["plain"] == train_scale.gpt(64, 2, 32).parameters
    assert result["hetmem"][0]["within_device_budget"]


def test_without_deepspeed_it_says_so_and_runs_hetmem_alone(monkeypatch, tmp_path):
    monkeypatch.setattr(nvme_vs_deepspeed, "deepspeed_available", lambda: False)
    args = nvme_vs_deepspeed.build_parser().parse_args(
        ["--dir", str(tmp_path), "--d-model", "128", "--layers", "4", "--block-size", "32", "--rounds", "1",
         "--steps", "1", "--device-budget", "2MiB", "--host-budget", "6MiB"])
    result = nvme_vs_deepspeed.measure(args)
    assert not result["deepspeed_available"] and list(result["runs"]) == ["hetmem"]
    assert result["summary"]["hetmem"]["ok"], result["runs"]
    assert result["summary"]["hetmem"]["disk_bytes_per_step"] > 0  # the state really is on NVMe
    assert "ratios" not in result
    assert "DeepSpeed is not importable" in nvme_vs_deepspeed.table(result)


def test_hetmems_steps_run_overlapped_and_only_the_last_is_finished_early(monkeypatch, tmp_path):
    """``engine.last_step`` finishes an overlapped step at once: the benchmark reads it only
    after the last step, so every other step's rest runs in the next forward, as in training."""
    import hetmem.engine

    args = nvme_vs_deepspeed.build_parser().parse_args(
        ["--dir", str(tmp_path), "--d-model", "128", "--layers", "4", "--block-size", "32", "--rounds", "1",
         "--steps", "3", "--device-budget", "2MiB", "--host-budget", "6MiB"])
    spec = nvme_vs_deepspeed.child_spec(args, str(tmp_path))
    finished_early = []
    real = hetmem.engine.Engine.last_step

    def last_step(engine):
        finished_early.append(engine.adam.pending is not None)
        return real.fget(engine)

    monkeypatch.setattr(hetmem.engine.Engine, "last_step", property(last_step))
    result = nvme_vs_deepspeed.run_hetmem(spec)
    assert finished_early == [True], finished_early  # once: the last step, which was pending
    assert len(result["step_seconds"]) == 4 and result["optimizer_io_bytes_per_step"] > 0
