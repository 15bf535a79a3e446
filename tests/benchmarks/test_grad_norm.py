"""benchmarks/grad_norm.py runs end to end on a tiny GPT and reports what it says it does."""
from __future__ import annotations

import json

import pytest

from hetmem.benchmarks import grad_norm
from hetmem.ops import adam


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_grad_norm_benchmark_json(dtype, capsys):
    assert grad_norm.main(["--d-model", "64", "--layers", "1", "--rounds", "2", "--dtype", dtype, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["gradients"] > 0 and result["config"]["dtype"] == dtype
    assert all(t > 0 for t in result["median_s"].values())
    assert result["paired_ratio_torch_over_hetmem"] > 0
    assert result["largest_temporary_bytes"]["torch"] == (0 if dtype == "fp32" else 4 * 64 * 256)
    if adam.is_available() and dtype != "fp32":  # fp32 takes torch's vector_norm on both sides
        assert result["relative_error_vs_float64"]["hetmem"] <= 1e-6
    assert result["relative_error_vs_float64"]["torch"] <= 1e-3


def test_grad_norm_benchmark_rejects_bad_rounds():
    with pytest.raises(SystemExit):
        grad_norm.main(["--rounds", "0"])


def test_grad_norm_in_training_restores_the_engine_norm(tmp_path, capsys):
    import hetmem.grads

    original = hetmem.grads.squared_norm
    assert grad_norm.main(["--in-training", str(tmp_path), "--d-model", "64", "--layers", "2", "--steps", "1",
                           "--host-budget", "2MiB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert hetmem.grads.squared_norm is original
    assert result["mode"] == "in_training"
    assert all(t > 0 for t in result["norm_s_per_backward"].values())
    assert all(t > 0 for t in result["iteration_s"].values())
