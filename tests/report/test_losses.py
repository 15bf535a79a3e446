"""The training loop's losses in the report: trace key, summary key, text line, PNG panel."""
from __future__ import annotations

import json
import math

import pytest

from hetmem.report import MemoryReport
from hetmem.report.plot import render_png

from .synthetic import synthetic_trace

LOSSES = [{"step": 1, "loss": 5.5, "lr": 1e-4}, {"step": 2, "loss": float("nan"), "lr": 2e-4},
          {"step": 3, "loss": 4.25, "lr": None}]


def test_losses_go_into_the_summary_and_the_text():
    report = MemoryReport(synthetic_trace()).with_losses(LOSSES)
    summary = json.loads(report.to_json())
    assert summary["losses"] == [{"step": 1, "loss": 5.5, "lr": 1e-4}, {"step": 2, "loss": None, "lr": 2e-4},
                                 {"step": 3, "loss": 4.25, "lr": None}]
    assert "loss 5.5 at step 1 -> 4.25 at step 3 (lowest 4.25 at step 3; 3 steps recorded)" in report.to_text()
    assert MemoryReport(synthetic_trace()).summary()["losses"] == []
    assert "loss " not in MemoryReport(synthetic_trace()).to_text().split("\n\n")[0]


def test_saved_losses_load_back(tmp_path):
    MemoryReport(synthetic_trace()).with_losses(LOSSES).save(tmp_path)
    assert MemoryReport.load(tmp_path).summary()["losses"][2] == {"step": 3, "loss": 4.25, "lr": None}


@pytest.mark.parametrize("losses, message", [
    ([{"step": 2, "loss": 1.0}, {"step": 2, "loss": 1.0}], "losses[1].step: expected steps in increasing order"),
    ([{"step": 1, "loss": "low"}], "losses[0].loss: expected a finite number or null, found 'low'"),
    ([{"step": 1, "loss": math.inf}], "losses[0].loss: expected a finite number or null"),
    ([{"loss": 1.0}], "losses[0].step: expected an int >= 1 (the optimizer step), found nothing (missing or null)"),
])
def test_bad_losses_are_named(losses, message):
    trace = {**synthetic_trace(), "losses": losses}
    with pytest.raises(ValueError) as error:
        MemoryReport(trace)
    assert message in str(error.value)


def test_png_grows_a_loss_panel():
    pytest.importorskip("matplotlib")
    plain = render_png(synthetic_trace())
    with_losses = render_png(MemoryReport(synthetic_trace()).with_losses(LOSSES).trace)
    height = int.from_bytes(plain[20:24], "big")
    assert int.from_bytes(with_losses[20:24], "big") > height
