"""One self-contained HTML file: images embedded as data URIs, no script, no network, readable on a phone (the table
scrolls inside its own box; the page never scrolls sideways)."""

from __future__ import annotations

import base64
import html

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:12px;
color:#222;line-height:1.4}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
.scroll{overflow-x:auto;max-width:100%;border:1px solid #ddd;border-radius:6px}
table{border-collapse:collapse;font-size:.85em;white-space:nowrap}
th,td{padding:4px 8px;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left;position:sticky;left:0;background:#fff}
th{background:#f6f6f6}
td.na{color:#999;font-style:italic}
img{max-width:100%;height:auto;display:block;margin:12px 0}
p.note{font-size:.85em;color:#555;overflow-wrap:anywhere}
"""


def _cell(value, column: str) -> str:
    from yoloslim.report import fmt

    text = fmt(value, column)
    css = ' class="na"' if value is None else ""
    return f"<td{css}>{html.escape(text)}</td>"


def render_html(tables, images) -> str:
    from yoloslim.report import COLUMNS, _context

    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name=viewport content="width=device-width,initial-scale=1">',
        f"<title>yoloslim report</title><style>{STYLE}</style></head><body>",
        "<h1>yoloslim comparison report</h1>",
    ]
    for summary, table in tables:
        parts.append(f"<h2>{html.escape(summary['name'])}</h2><p class=note>{html.escape(_context(summary))}</p>")
        head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
        body = "".join("<tr>" + "".join(_cell(r[c], c) for c in COLUMNS) + "</tr>" for r in table)
        parts.append(
            f"<div class=scroll><table class=variants><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
        )
    for title, path in images:
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(
            f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
        )
    parts.append("</body></html>")
    return "\n".join(parts)
