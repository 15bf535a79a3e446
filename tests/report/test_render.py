"""The text table, the PNG and the HTML page, with and without matplotlib."""
from __future__ import annotations

import base64
import logging
import re
import struct
import sys

import pytest

from hetmem.report import MemoryReport
from hetmem.report.plot import MISSING_MATPLOTLIB, MatplotlibMissingError, NothingToPlotError

from .synthetic import synthetic_trace

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _section(text: str, title_start: str) -> list[str]:
    """The lines of one table section, title to blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title_start))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def _row(section: list[str], first_cell: str) -> list[str]:
    return next(line.split() for line in section if line.split()[:1] == [first_cell])


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def report():
    return MemoryReport(synthetic_trace())


def test_text_has_the_numbers_in_a_terminal_width(report):
    text = report.to_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "model two-linear: 1,700,000 parameters (1,700,000 trainable), bf16 on cpu" in text
    assert "budgets: device 64.00 MiB, host 256.00 MiB, nvme 1.00 GiB; chunks of up to 1,048,576 elements" in text
    assert "showing step 1 (2 steps recorded, 1 of them warm-up)" in text
    peaks = _section(text, "Peak memory per tier")
    assert _row(peaks, "device") == ["device", "26.00", "MiB", "64.00", "MiB", "40.6%", "2", "pre_backward",
                                     "layers.1"]
    assert _row(peaks, "host") == ["host", "30.00", "MiB", "256.00", "MiB", "11.7%", "4", "optimizer",
                                   "(optimizer)"]
    parts = _section(text, "Model data by chunk kind")
    assert parts[2].split() == ["tier", "PARAM", "MASTER", "EXP_AVG", "EXP_AVG_SQ", "GRAD", "non-model"]
    assert " ".join(_row(parts, "device")) == "device at peak 4.00 MiB 0 B 0 B 0 B 2.00 MiB 20.00 MiB"
    moved = _section(text, "Bytes moved, step 1")
    assert " ".join(_row(moved, "host->device")) == "host->device 3 6.00 MiB 3.0 ms prefetch 4.00 MiB, fetch 2.00 MiB"
    assert " ".join(_row(moved, "total")) == "total 12 36.00 MiB 6.0 ms"
    per_step = _section(text, "Bytes moved per step and direction")
    assert per_step[2].split() == ["step", "host->device", "device->host", "host->nvme", "nvme->host", "total"]
    assert " ".join(_row(per_step, "1")) == "1 6.00 MiB 6.00 MiB 12.00 MiB 12.00 MiB 36.00 MiB"
    steps = _section(text, "Every recorded step")
    assert " ".join(_row(steps, "0")) == "0 (warm-up) 1.000 s 10.0 ms 1.0% 36.00 MiB 3 28.00 MiB"
    padding = _section(text, "Chunk padding")
    assert " ".join(_row(padding, "total")) == "total 9 30.00 MiB 24.60 MiB 5.40 MiB 18.0%"
    top = _section(text, "Top 5 moments by non-model memory, step 1")
    assert [line.split()[0] for line in top[4:9]] == ["2", "3", "1", "0", "4"]
    assert " ".join(top[4].split()) == "2 pre_backward layers.1 20.00 MiB 44.00 MiB 26.00 MiB"
    time = _section(text, "Time, step 1")
    assert " ".join(_row(time, "waiting")) == "waiting on transfers 6.0 ms 0.8%"
    assert " ".join(_row(time, "optimizer")) == "optimizer 250.0 ms 31.2%"
    assert "layers.1  22.00 MiB" in text                      # the profiled per-module table


def test_text_of_the_warmup_step(report):
    text = report.to_text(step=0)
    assert "Peak memory per tier, step 0 (warm-up)" in text
    assert " ".join(_row(_section(text, "Peak memory per tier"), "device"))[:22] == "device 28.00 MiB 64.00"


def test_text_stays_narrow_with_many_steps_long_names_and_every_direction():
    trace = synthetic_trace()
    long_name = "transformer.blocks.11.attention.output_projection.dropout"
    trace["steps"][1]["moments"][2]["module"] = long_name
    extra = dict(trace["steps"][1]["moves"][0], src="nvme", dst="device")
    trace["steps"][1]["moves"] += [extra, dict(extra, src="device", dst="nvme")]
    base = trace["steps"][1]
    trace["steps"] = [dict(base, step=i, warmup=i == 0) for i in range(30)]
    text = MemoryReport(trace).to_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "... 19 more steps (see to_json())" in text            # 3 first + 8 last listed
    assert "..." + long_name[-31:] in text
    per_step = _section(text, "Bytes moved per step and direction")
    headers = [line.split() for line in per_step if line.split()[:1] == ["step"]]
    assert len(headers) == 2                                     # six directions: two blocks of columns
    assert sum(len(h) - 1 for h in headers) == 7                 # 6 directions + total


def test_text_without_steps():
    trace = synthetic_trace()
    trace["steps"] = []
    text = MemoryReport(trace).to_text()
    assert "showing no step recorded yet" in text
    assert "(none)" in text


def test_png_is_a_readable_size(report, tmp_path):
    path = report.save_png(tmp_path / "memory.png")
    data = path.read_bytes()
    assert _png_size(data) == (1440, 840)                        # 12 x 7 in at 120 dpi
    assert len(data) > 20_000
    assert not list(tmp_path.glob(".*tmp*"))


def test_png_needs_moments():
    trace = synthetic_trace()
    trace["steps"] = []
    with pytest.raises(NothingToPlotError, match="no recorded moments"):
        MemoryReport(trace).save_png("/nonexistent/never/written.png")


def test_html_is_self_contained(report, tmp_path):
    page = report.save_html(tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 1 and _png_size(base64.b64decode(images[0])) == (1440, 840)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page)
    assert "<script" not in page and "<link" not in page
    assert page.count("<table>") == 9
    for expected in ("Peak memory per tier, step 1", "26.00 MiB", "Every recorded step", "0 (warm-up)",
                     "Chunk padding", "5.40 MiB", "Top 5 moments by non-model memory", "layers.1",
                     "waiting on transfers", "budgets: device 64.00 MiB",
                     "&quot;format&quot;: &quot;hetmem-memory-summary"):
        assert expected in page, expected


def test_without_matplotlib(report, tmp_path, monkeypatch, caplog):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)             # import raises ImportError
    with pytest.raises(MatplotlibMissingError) as raised:
        report.save_png(tmp_path / "memory.png")
    assert str(raised.value) == MISSING_MATPLOTLIB == "save_png needs matplotlib: pip install 'hetmem[report]'"
    page = report.save_html(tmp_path / "report.html").read_text()
    assert "<img" not in page and "No timeline plot: the plot needs matplotlib" in page
    assert "hetmem[report]" in page and page.count("<table>") == 9
    with caplog.at_level(logging.WARNING, logger="hetmem.report"):
        paths = report.render_all(tmp_path / "out")
    assert set(paths) == {"text", "json", "html", "chrome_trace"}
    assert "needs matplotlib" in caplog.text
    assert not (tmp_path / "out" / "memory.png").exists()


@pytest.mark.parametrize("top, unit, step", [(70 * 2**20, "MiB", 16), (7.5 * 2**30, "GiB", 2),
                                             (900 * 2**10, "KiB", 256), (1.5 * 2**20, "MiB", 0.25)])
def test_y_axis_ticks_are_binary_units(top, unit, step):
    from matplotlib.figure import Figure

    from hetmem.report.plot import _binary_y_axis

    ax = Figure().subplots()
    _binary_y_axis(ax, top)
    unit_bytes = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
    ticks = [t for t in ax.yaxis.get_major_locator().tick_values(0, top) if 0 <= t <= top]
    assert ticks[1] - ticks[0] == step * unit_bytes and len(ticks) >= 4
    label = ax.yaxis.get_major_formatter()
    assert label(ticks[1], 1) == f"{step:g} {unit}" and label(0, 0) == "0"
