"""One self-contained HTML file: images embedded as data URIs, no script, no network, readable on a phone (the table
scrolls inside its own box; the page never scrolls sideways). Each run leads with its headline, then its table."""

from __future__ import annotations

import base64
import html
import struct
from pathlib import Path

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:12px;
color:#222;line-height:1.4}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
p.headline{font-size:1.25em;font-weight:600;margin:.4em 0 .2em;overflow-wrap:anywhere}
.scroll{overflow-x:auto;max-width:100%;border:1px solid #ddd;border-radius:6px}
table{border-collapse:collapse;font-size:.85em;white-space:nowrap}
th,td{padding:4px 8px;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left;position:sticky;left:0;background:#fff}
th{background:#f6f6f6;white-space:normal;vertical-align:bottom}
td.na{color:#999;font-style:italic}
img{max-width:100%;height:auto;display:block;margin:12px 0}
p.note{font-size:.85em;color:#555;overflow-wrap:anywhere}
"""


def _cell(value, column: str) -> str:
    from yoloslim.report import NOT_MEASURED, fmt

    text = fmt(value, column)
    css = ' class="na"' if text == NOT_MEASURED else ""
    return f"<td{css}>{html.escape(text)}</td>"


def png_width(path: Path) -> int:
    """Width in pixels, from the PNG header."""
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def _image(title: str, path: Path) -> str:
    from yoloslim.report.plots import PIXEL_RATIO

    data = base64.b64encode(path.read_bytes()).decode()
    width = png_width(path) // PIXEL_RATIO
    alt = html.escape(title)
    return f'<h2>{alt}</h2><img alt="{alt}" width={width} src="data:image/png;base64,{data}">'


def _run(summary: dict, table: list) -> str:
    from yoloslim.report import COLUMNS, context, header, headline, headline_basis, prune_latency, thread_counts

    head = "".join(f"<th>{html.escape(header(c, thread_counts(summary)))}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(_cell(r[c], c) for c in COLUMNS) + "</tr>" for r in table)
    basis = headline_basis(summary)
    return "".join(
        [
            f"<h2>{html.escape(summary['name'])}</h2>",
            f"<p class=headline>{html.escape(headline(summary))}</p>",
            f"<p class=note>{html.escape(basis)}</p>" if basis else "",
            f"<div class=scroll><table class=variants><thead><tr>{head}</tr></thead>",
            f"<tbody>{body}</tbody></table></div>",
            f"<p class=note>{html.escape(context(summary))}</p>",
            "".join(f"<p class=note>{html.escape(line)}</p>" for line in prune_latency(summary)),
        ]
    )


def render_html(tables, images) -> str:
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name=viewport content="width=device-width,initial-scale=1">',
        f"<title>yoloslim report</title><style>{STYLE}</style></head><body>",
        "<h1>yoloslim comparison report</h1>",
    ]
    parts += [_run(summary, table) for summary, table in tables]
    parts += [_image(title, path) for title, path in images]
    parts.append("</body></html>")
    return "\n".join(parts)
