"""The report as text for a terminal: at most WIDTH columns, one section per table."""
from __future__ import annotations

from typing import Any

from hetmem.report.tables import Table, header_lines, is_gap_row, report_tables

WIDTH = 100
INDENT = "  "
GAP = "  "                      # between columns


def render_text(summary: dict[str, Any]) -> str:
    lines = ["hetmem memory report", "=" * len("hetmem memory report")]
    lines += header_lines(summary)
    for table in report_tables(summary):
        lines.append("")
        lines += render_table(table)
    return "\n".join(_fit(line) for line in lines) + "\n"


def render_table(table: Table, width: int = WIDTH) -> list[str]:
    """The title, the table (split into blocks of columns if it is wider than ``width``;
    each block repeats the first column), and the note."""
    lines = [table.title, "-" * min(len(table.title), width)]
    everything = [table.headers, *(r for r in table.rows if not is_gap_row(r)), *table.footer]
    widths = [max(len(row[i]) for row in everything) for i in range(len(table.headers))]
    for columns in _column_blocks(widths, width - len(INDENT)):
        lines += _block(table, widths, columns)
    if table.note:
        lines.append(INDENT + table.note)
    return lines


def _column_blocks(widths: list[int], width: int) -> list[list[int]]:
    blocks: list[list[int]] = [[0]]
    used = widths[0]
    for i in range(1, len(widths)):
        if used + len(GAP) + widths[i] > width and len(blocks[-1]) > 1:
            blocks.append([0])
            used = widths[0]
        blocks[-1].append(i)
        used += len(GAP) + widths[i]
    return blocks


def _block(table: Table, widths: list[int], columns: list[int]) -> list[str]:
    def line(cells: list[str]) -> str:
        parts = [cells[i].rjust(widths[i]) if table.align[i] == "r" else cells[i].ljust(widths[i])
                 for i in columns]
        return (INDENT + GAP.join(parts)).rstrip()

    rule = INDENT + GAP.join("-" * widths[i] for i in columns)
    lines = [line(table.headers), rule]
    if not table.rows:
        lines.append(INDENT + "(none)")
    lines += [INDENT + row[0] if is_gap_row(row) else line(row) for row in table.rows]
    if table.footer:
        lines.append(rule)
        lines += [line(row) for row in table.footer]
    return lines


def _fit(line: str) -> str:
    return line if len(line) <= WIDTH else line[:WIDTH - 3] + "..."
