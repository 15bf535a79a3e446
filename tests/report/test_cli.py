"""`hetmem report RUN_DIR` end to end, MemoryReport.save/load, and their error messages."""
from __future__ import annotations

import json

import pytest

from hetmem.cli import main
from hetmem.report import MemoryReport, TraceVersionError

from .synthetic import synthetic_trace

RENDERED = ["report.txt", "summary.json", "memory.png", "report.html", "trace.chrome.json"]


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    MemoryReport(synthetic_trace()).save(run)
    return run


def test_save_writes_the_trace_atomically_and_load_reads_it_back(run_dir):
    assert sorted(p.name for p in run_dir.iterdir()) == ["trace.json"]      # no temporary file left
    assert json.loads((run_dir / "trace.json").read_text()) == synthetic_trace()
    assert MemoryReport.load(run_dir).trace == synthetic_trace()
    assert MemoryReport.load(run_dir / "trace.json").trace == synthetic_trace()


def test_report_renders_a_saved_run(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for name in RENDERED:
        assert (run_dir / name).is_file(), name
        assert str(run_dir / name) in out
    expected_text = MemoryReport(synthetic_trace()).to_text()
    assert (run_dir / "report.txt").read_text() == expected_text
    assert out.startswith(expected_text)
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 1
    assert (run_dir / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run_dir / "trace.chrome.json").read_text())["displayTimeUnit"] == "ms"
    assert "data:image/png;base64," in (run_dir / "report.html").read_text()


def test_report_out_and_step(run_dir, tmp_path, capsys):
    out_dir = tmp_path / "elsewhere" / "nested"
    assert main(["report", str(run_dir / "trace.json"), "--out", str(out_dir), "--step", "0"]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(RENDERED)
    assert sorted(p.name for p in run_dir.iterdir()) == ["trace.json"]
    assert "Peak memory per tier, step 0 (warm-up)" in (out_dir / "report.txt").read_text()
    assert json.loads((out_dir / "summary.json").read_text())["step"] == 0


def _error(argv, capsys) -> str:
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("hetmem report: error: ")
    return captured.err


def test_report_errors(tmp_path, run_dir, capsys):
    missing = tmp_path / "no_such_run"
    assert "no_such_run does not exist; give the folder of a run" in _error(["report", str(missing)], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty has no trace.json, so it is not the folder of a run" in _error(["report", str(empty)], capsys)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    assert "garbage.json is not a hetmem trace: it is not JSON" in _error(["report", str(garbage)], capsys)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"traceEvents": []}))
    assert "other.json: not a hetmem trace: format: expected 'hetmem-trace'" in _error(["report", str(other)], capsys)
    newer = synthetic_trace()
    newer["version"] = 7
    (tmp_path / "newer").mkdir()
    (tmp_path / "newer" / "trace.json").write_text(json.dumps(newer))
    message = _error(["report", str(tmp_path / "newer")], capsys)
    assert "format version 7, newer than the version 1 this hetmem reads" in message
    assert "pip install -U hetmem" in message
    broken = synthetic_trace()
    broken["steps"][1]["moments"][3]["device"]["non_model"] = -1
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    assert "steps[1].moments[3].device.non_model: expected an int >= 0 (bytes), found -1" in \
        _error(["report", str(tmp_path / "broken.json")], capsys)
    assert "step=9 is not in this trace; recorded steps: 0, 1" in _error(["report", str(run_dir), "--step", "9"],
                                                                        capsys)


def test_load_raises_typed_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        MemoryReport.load(tmp_path / "missing")
    newer = synthetic_trace()
    newer["version"] = 2
    (tmp_path / "trace.json").write_text(json.dumps(newer))
    with pytest.raises(TraceVersionError, match=r"trace\.json: this trace has format version 2"):
        MemoryReport.load(tmp_path)


def test_report_without_matplotlib_says_so(run_dir, monkeypatch, capsys):
    import sys

    for name in ("matplotlib", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "(no memory.png: save_png needs matplotlib: pip install 'hetmem[report]')" in out
    assert not (run_dir / "memory.png").exists() and (run_dir / "report.html").is_file()
