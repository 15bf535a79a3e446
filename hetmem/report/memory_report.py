"""MemoryReport: one run trace (see schema.py) and every way to show it."""
from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from hetmem.report.schema import TraceVersionError, validate_trace
from hetmem.report.summary import summarize

logger = logging.getLogger("hetmem.report")

TRACE_FILE = "trace.json"
# render_all's files: key -> file name
OUTPUT_FILES = {"text": "report.txt", "json": "summary.json", "png": "memory.png",
                "html": "report.html", "chrome_trace": "trace.chrome.json"}


class MemoryReport:
    """Where the memory of a run went and what the offload cost, from the engine's trace.

    ``MemoryReport(trace)`` validates the trace and keeps its own copy; ``step`` arguments
    name a recorded iteration by its number and default to the last steady (non-warm-up)
    step, else the last one.
    """

    def __init__(self, trace: dict[str, Any]):
        validate_trace(trace)
        self.trace = copy.deepcopy(trace)    # a snapshot: the engine goes on recording into its own

    @classmethod
    def load(cls, path: str | os.PathLike) -> MemoryReport:
        """Read a run folder (its trace.json) or a trace file."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; give the folder of a run (`hetmem train` writes "
                                    f"{TRACE_FILE} there) or the path of a {TRACE_FILE}")
        file = path / TRACE_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{path} has no {TRACE_FILE}, so it is not the folder of a run; "
                                    f"`hetmem train` and MemoryReport.save(folder) write one")
        try:
            trace = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{file} is not a hetmem trace: it is not JSON ({error})") from None
        try:
            return cls(trace)
        except TraceVersionError as error:
            raise TraceVersionError(f"{file}: {error}") from None
        except ValueError as error:
            raise ValueError(f"{file}: {error}") from None

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write ``run_dir/trace.json`` (atomically: a reader never sees half a file)."""
        path = Path(run_dir) / TRACE_FILE
        _write_atomic(path, json.dumps(self.trace, indent=1).encode("utf-8"))
        return path

    def with_losses(self, losses: list[dict[str, Any]]) -> MemoryReport:
        """This report with the training loop's losses ([{"step", "loss", "lr"}], steps 1-based
        and increasing; non-finite values are kept as null), shown beside the memory."""
        def finite(value):
            return float(value) if value is not None and math.isfinite(value) else None

        rows = [{"step": int(e["step"]), "loss": finite(e.get("loss")), "lr": finite(e.get("lr"))} for e in losses]
        return MemoryReport({**self.trace, "losses": rows})

    def summary(self, step: int | None = None) -> dict[str, Any]:
        """The numbers, as a dict with the keys documented in hetmem/report/summary.py."""
        return summarize(self.trace, step)

    def to_json(self, step: int | None = None) -> str:
        return json.dumps(self.summary(step), indent=2)

    def to_text(self, step: int | None = None) -> str:
        from hetmem.report.text import render_text

        return render_text(self.summary(step))

    def save_png(self, path: str | os.PathLike, step: int | None = None) -> Path:
        """The memory timeline of one step; needs matplotlib (pip install 'hetmem[report]')."""
        from hetmem.report.plot import render_png

        path = Path(path)
        _write_atomic(path, render_png(self.trace, step))
        return path

    def save_html(self, path: str | os.PathLike, step: int | None = None) -> Path:
        """One self-contained page: the timeline (when matplotlib is installed) and the tables."""
        from hetmem.report.html import render_html
        from hetmem.report.plot import MatplotlibMissingError, NothingToPlotError, render_png

        summary = self.summary(step)
        png, missing = None, ""
        try:
            png = render_png(self.trace, step)
        except MatplotlibMissingError as error:
            missing = str(error).replace("save_png", "the plot")
        except NothingToPlotError as error:
            missing = str(error)
        path = Path(path)
        _write_atomic(path, render_html(summary, png, missing).encode("utf-8"))
        return path

    def save_chrome_trace(self, path: str | os.PathLike) -> Path:
        """Every step as Chrome / Perfetto trace-event JSON (open in ui.perfetto.dev)."""
        from hetmem.report.chrome_trace import build_chrome_trace

        path = Path(path)
        _write_atomic(path, json.dumps(build_chrome_trace(self.trace)).encode("utf-8"))
        return path

    def render_all(self, out_dir: str | os.PathLike, step: int | None = None) -> dict[str, Path]:
        """Write report.txt, summary.json, memory.png (with matplotlib), report.html and
        trace.chrome.json into ``out_dir``; return {kind: path} for the files written."""
        from hetmem.report.plot import MatplotlibMissingError, NothingToPlotError

        out = Path(out_dir)
        paths = {"text": out / OUTPUT_FILES["text"], "json": out / OUTPUT_FILES["json"]}
        _write_atomic(paths["text"], self.to_text(step).encode("utf-8"))
        _write_atomic(paths["json"], self.to_json(step).encode("utf-8"))
        try:
            paths["png"] = self.save_png(out / OUTPUT_FILES["png"], step)
        except (MatplotlibMissingError, NothingToPlotError) as error:
            logger.warning("memory report: no %s: %s", OUTPUT_FILES["png"], error)
        paths["html"] = self.save_html(out / OUTPUT_FILES["html"], step)
        paths["chrome_trace"] = self.save_chrome_trace(out / OUTPUT_FILES["chrome_trace"])
        return paths


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
