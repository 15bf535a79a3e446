"""The CLI end to end: `hetmem train` (tiny), `hetmem profile`, `hetmem report` of that run."""
from __future__ import annotations

import json

from hetmem.cli import main


def test_train_writes_a_report_and_stays_in_budget(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--d-model", "64", "--layers", "2", "--heads", "2", "--block-size", "32",
                 "--batch-size", "2", "--steps", "4", "--device", "cpu", "--device-budget", "1MiB",
                 "--out", str(out), "--sample", "16", "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "x the device budget" in text and "within budget" in text and "sample:" in text
    for name in ("trace.json", "report.txt", "report.html", "trace.chrome.json", "memory.png", "options.json"):
        assert (out / name).is_file(), name
    assert main(["report", str(out), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.html").is_file()


def test_train_bad_budget_is_one_clear_error(tmp_path, capsys):
    code = main(["train", "--d-model", "64", "--layers", "2", "--heads", "2", "--device", "cpu",
                 "--device-budget", "1KiB", "--out", str(tmp_path), "--steps", "1"])
    assert code == 2
    assert "hetmem train: error: device_budget=1.00 KiB" in capsys.readouterr().err


def test_profile_json(capsys):
    assert main(["profile", "--d-model", "64", "--layers", "2", "--heads", "2", "--block-size", "32",
                 "--batch-size", "2", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["min_device_budget"] < result["plain_total_bytes"]
