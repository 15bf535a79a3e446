"""The GPU acceptance command (benchmarks/gpu_acceptance.py, `hetmem bench gpu`): its
orchestration runs on the simulated device here, so it cannot rot before a GPU runs it."""
from __future__ import annotations

import json

import pytest

from hetmem import cli
from hetmem.accelerator import SIM_ENV, default_accelerator


def test_without_an_accelerator_it_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.delenv(SIM_ENV, raising=False)
    if default_accelerator().separate_memory:
        pytest.skip("this machine has an accelerator")
    assert cli.main(["bench", "gpu"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"skipped": "no CUDA"}
    assert len(captured.err.strip().splitlines()) == 1 and "no CUDA" in captured.err


def test_the_whole_run_on_the_simulated_device(monkeypatch, capsys):
    monkeypatch.setenv(SIM_ENV, "sim")
    from hetmem.benchmarks import gpu_acceptance

    assert gpu_acceptance.main(["--model", "tiny", "--steps", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accelerator"]["name"] == "sim"
    assert result["gpu_tests"]["passed"], result["gpu_tests"]
    h = result["hetmem"]
    assert h["ok"] and h["budget_held"] and 0 < h["allocator_peak_bytes"] <= result["budget_bytes"]
    assert h["tokens_per_s"] > 0 and h["step_s"]["transfer_wait_s"] >= 0
    parts = h["step_s"]["compute_s"] + h["step_s"]["transfer_wait_s"] + h["step_s"]["cpu_adam_s"]
    assert parts == pytest.approx(h["step_s"]["seconds"], rel=0.5)
    assert result["model"]["state_bytes"] > 0 and result["plain"]["fits"]
    assert "hetmem_vs_plain_tokens_per_s" in result
    assert "skipped" in result["deepspeed"] or "ok" in result["deepspeed"]
    assert result["passed"]
