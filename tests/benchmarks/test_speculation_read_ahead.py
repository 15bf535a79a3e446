"""``benchmarks/speculation_read_ahead.py`` at toy size: both variants run, the "before" engine
gets the round-before read-ahead, the JSON holds the paired figures, bad input is one line."""
from __future__ import annotations

import json

import pytest

from hetmem.benchmarks import speculation_read_ahead as bench
from hetmem.speculation import EXTRA_READ_AHEAD, READ_SHARE

TOY = ["--d-model", "128", "--layers", "2", "--block-size", "32", "--host-budget", "4MiB", "--steps", "2",
       "--rounds", "1"]


def test_both_variants_run_paired_and_clean_up(tmp_path, capsys, monkeypatch):
    settings = {}
    engine = bench._engine

    def recorded(args, name, folder):
        made = engine(args, name, folder)
        s = made.adam.speculation
        settings[name] = (s.read_share, s.extra_read_ahead, s.room_ahead)
        return made

    monkeypatch.setattr(bench, "_engine", recorded)
    assert bench.main([str(tmp_path), *TOY, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert settings == {"now": (READ_SHARE, EXTRA_READ_AHEAD, True), "before": (0.75, 0, False)}
    assert set(result["variants"]) == {"now", "before"} and result["pairs"] == 2
    for figures in result["variants"].values():
        assert figures["iteration_s"] > 0 and figures["speculated_groups"] > 0
    assert 0 < result["paired_now_over_before"] < 10
    assert not any(tmp_path.iterdir()), "the swap files are removed"


@pytest.mark.parametrize("argv,message", [(["--host-budget", "12XB"], "is not a size"),
                                          (["--steps", "0"], "must be >= 1")])
def test_bad_arguments_are_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        bench.main([str(tmp_path), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_budget_the_engine_refuses_is_one_line(tmp_path, capsys):
    toy = [a if a != "4MiB" else "3MiB" for a in TOY]
    assert bench.main([str(tmp_path), *toy]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "raise host_budget" in err
