"""The report as one self-contained HTML file: the timeline (an embedded PNG), the tables
and the summary JSON.  No scripts, no external references: it opens offline, anywhere."""
from __future__ import annotations

import base64
import html
import json
from typing import Any

from hetmem.report.tables import Table, header_lines, is_gap_row, report_tables

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       margin: 24px auto; max-width: 1280px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 6px; }
h2 { font-size: 16px; margin: 0 0 6px; }
.meta { color: #555; margin: 0 0 16px; }
.meta div { margin: 1px 0; }
figure { margin: 0 0 20px; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
.missing { padding: 12px 16px; background: #fff6e0; border: 1px solid #e8c66a; }
.tables { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 22px 36px; }
section { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e4e4e4; white-space: nowrap; }
th { background: #f3f4f6; text-align: left; font-weight: 600; }
td.r, th.r { text-align: right; }
tfoot td { font-weight: 600; border-top: 2px solid #ccc; }
td.gap { color: #777; font-style: italic; }
.note { color: #666; font-size: 12px; margin: 4px 0 0; }
details { margin-top: 24px; }
pre { background: #f7f7f7; padding: 12px; overflow-x: auto; font-size: 12px; }
"""


def render_html(summary: dict[str, Any], png: bytes | None, png_missing: str = "") -> str:
    """The page for ``summary``; ``png`` is the timeline, or None with ``png_missing`` saying why."""
    esc = html.escape
    model = summary["meta"]["model"]["name"]
    title = f"hetmem memory report: {model}" + ("" if summary["step"] is None else f", step {summary['step']}")
    if png is not None:
        encoded = base64.b64encode(png).decode("ascii")
        figure = (f'<figure><img alt="memory timeline of step {summary["step"]}: bytes per tier at each moment" '
                  f'src="data:image/png;base64,{encoded}"></figure>')
    else:
        figure = f'<p class="missing">No timeline plot: {esc(png_missing)}</p>'
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
        f"<h1>{esc(title)}</h1>",
        '<div class="meta">' + "".join(f"<div>{esc(line)}</div>" for line in header_lines(summary)) + "</div>",
        figure,
        '<div class="tables">', *(render_table(t) for t in report_tables(summary)), "</div>",
        "<details><summary>summary JSON (the same numbers, as <code>MemoryReport.to_json()</code> gives "
        "them)</summary>",
        f"<pre>{esc(json.dumps(summary, indent=2))}</pre>", "</details>",
        "</body>", "</html>",
    ]
    return "\n".join(parts) + "\n"


def render_table(table: Table) -> str:
    esc = html.escape

    def row(cells: list[str], tag: str) -> str:
        if tag == "td" and is_gap_row(cells):
            return f'<tr><td class="gap" colspan="{len(cells)}">{esc(cells[0])}</td></tr>'
        return "<tr>" + "".join(f'<{tag} class="{a}">{esc(c)}</{tag}>' for c, a in zip(cells, table.align)) + "</tr>"

    body = [row(r, "td") for r in table.rows] or [f'<tr><td colspan="{len(table.headers)}">(none)</td></tr>']
    lines = ["<section>", f"<h2>{esc(table.title)}</h2>", "<table>",
             f"<thead>{row(table.headers, 'th')}</thead>", "<tbody>", *body, "</tbody>"]
    if table.footer:
        lines += ["<tfoot>", *(row(r, "td") for r in table.footer), "</tfoot>"]
    lines.append("</table>")
    if table.note:
        lines.append(f'<p class="note">{esc(table.note)}</p>')
    lines.append("</section>")
    return "\n".join(lines)
