"""The memory report: where a run's memory went and what the offload cost.

``MemoryReport(trace)`` renders a run trace (the format is documented in schema.py) as a
terminal table, a JSON summary, a PNG timeline, one self-contained HTML page and a
Chrome / Perfetto trace.  ``engine.memory_report()`` returns one; ``hetmem report RUN_DIR``
renders a saved run again.
"""
from __future__ import annotations

from hetmem.report.memory_report import MemoryReport
from hetmem.report.schema import TRACE_VERSION, TraceVersionError, validate_trace

__all__ = ["MemoryReport", "TRACE_VERSION", "TraceVersionError", "validate_trace"]
