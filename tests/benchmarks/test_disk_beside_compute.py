"""``benchmarks/disk_beside_compute.py`` at toy size: the step's IO is recorded and replayed alone and
beside a load that really computes meanwhile, the files are removed, bad input is one line."""
from __future__ import annotations

import json
import math

import pytest

from hetmem.benchmarks import disk_beside_compute as bench

TOY = ["--d-model", "128", "--layers", "2", "--block-size", "32", "--device-budget", "2MiB",
       "--host-budget", "4MiB"]


@pytest.fixture(autouse=True)
def short_measurements(monkeypatch):
    monkeypatch.setattr(bench, "MIN_SECONDS", 0.3)


def test_replays_alone_and_beside_a_computing_load_paired_by_round(tmp_path, capsys):
    assert bench.main([str(tmp_path), *TOY, "--rounds", "2", "--loads", "matmul/19", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"]["requests"] > 0 and result["step"]["bytes"] > 0
    assert result["step"]["backend"] in ("io_uring", "linux_aio", "threads")
    assert list(result["loads"]) == ["none", "matmul/19"]
    for name, figures in result["loads"].items():
        assert [row["round"] for row in figures["rows"]] == [0, 1]
        assert all(row["replays"] >= 1 and row["seconds"] >= 0.3 for row in figures["rows"])
        assert math.isfinite(figures["vs_alone"]) and figures["vs_alone"] > 0
    assert result["loads"]["none"]["vs_alone"] == 1.0
    # the load computed through its replays (a child that never ran would show ~0 cores)
    assert result["loads"]["matmul/19"]["load_cores"] > 0.3
    assert not any(tmp_path.iterdir()), "the swap and replay files are removed"


def test_only_its_own_files_are_removed(tmp_path, capsys):
    mine = tmp_path / "disk-beside-compute"  # a folder of the user's with the benchmark's name
    mine.mkdir()
    (mine / "keep.txt").write_text("data")
    assert bench.main([str(tmp_path), *TOY, "--rounds", "1", "--loads", "matmul/19", "--json"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk-beside-compute"]
    assert (mine / "keep.txt").read_text() == "data"


@pytest.mark.parametrize("argv,message", [(["--loads", "adam/5"], "load 'adam/5' is not one of"),
                                          (["--loads", ","], "no load given"),
                                          (["--rounds", "0"], "must be >= 1"),
                                          (["--host-budget", "12XB"], "is not a size")])
def test_bad_arguments_are_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        bench.main([str(tmp_path), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_step_that_moves_nothing_is_one_line(tmp_path, capsys):
    toy = [a for a in TOY if a not in ("--device-budget", "2MiB")]  # 64 MiB: the toy fits the device
    assert bench.main([str(tmp_path), *toy, "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lower --host-budget" in err
    assert not any(tmp_path.iterdir())


def test_a_load_that_cannot_start_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(bench.LOAD_CODE, "adam", "raise SystemExit('no kernel here')")
    assert bench.main([str(tmp_path), *TOY, "--rounds", "1", "--loads", "adam/0", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the 'adam' load exited at once" in err and "no kernel here" in err
    assert not any(tmp_path.iterdir())


def test_a_path_that_is_not_a_folder_is_one_line_and_nothing_is_created(tmp_path, capsys):
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    missing = tmp_path / "typo" / "nvme"
    for path in (taken, missing):
        assert bench.main([str(path), *TOY, "--rounds", "1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not a folder; give an existing folder" in err
    assert taken.read_text() == "not a folder" and not (tmp_path / "typo").exists()


def test_a_load_that_stops_during_its_measurement_is_an_error(tmp_path, capsys, monkeypatch):
    stops = "import time\nT0 = time.time()\ndef work():\n    time.sleep(0.01)\n    if time.time() - T0 > 0.2:\n        sys.exit(3)\n"
    monkeypatch.setitem(bench.LOAD_CODE, "matmul", stops)
    assert bench.main([str(tmp_path), *TOY, "--rounds", "1", "--loads", "matmul/0", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the 'matmul' load exited during its measurement (exit status 3" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv,message", [(["--loads", "adam/0,adam/0"], "load 'adam/0' is given twice"),
                                          (["--d-model", "200"], "--d-model 200 must be below 128 or a multiple")])
def test_more_bad_arguments_are_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        bench.main([str(tmp_path), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
