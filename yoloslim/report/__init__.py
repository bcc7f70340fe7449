"""The comparison report: every variant's accuracy and speed side by side, as Markdown, self-contained HTML and CSV.

Input: run folders written by `yoloslim slim`, each with a summary.json:

    {"name": ..., "data": ..., "imgsz": ..., "environment": {...},
     "variants": [{"name", "stage", "backend", "precision", "weights", "eval": {...} | null, "bench": {...} | null}],
     "prune": {"widths": {layer: [before, after]}} | null, "gamma_history": {...} | null}

A figure that was not measured on the machine that made the run (TensorRT on a host without a GPU) reads
"not measured".
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.files import write_text_atomic

SUMMARY = "summary.json"
COLUMNS = (
    "variant",
    "stage",
    "backend",
    "precision",
    "mAP50-95",
    "mAP50-95 95% CI",
    "mAP50",
    "ΔmAP50-95 vs base",
    "latency p50 ms",
    "FPS end to end",
    "speedup vs base",
    "params",
    "GFLOPs",
    "size MB",
)


def load_runs(runs: list) -> list[dict]:
    loaded = []
    for run in map(Path, runs):
        path = run / SUMMARY if run.is_dir() else run
        if not path.is_file():
            raise YoloslimError(f"{run} has no {SUMMARY}; pass run folders written by yoloslim slim")
        loaded.append(json.loads(path.read_text()))
    return loaded


def rows(summary: dict) -> list[dict]:
    """One table row per variant, with deltas against the run's first (base) variant."""
    variants = summary["variants"]
    base = variants[0]
    base_map = (base.get("eval") or {}).get("map")
    base_ms = ((base.get("bench") or {}).get("model") or {}).get("p50_ms")
    out = []
    for v in variants:
        ev, be = v.get("eval") or {}, v.get("bench") or {}
        p50 = (be.get("model") or {}).get("p50_ms")
        ci = ev.get("ci95", {}).get("map")
        out.append(
            {
                "variant": v["name"],
                "stage": v.get("stage", ""),
                "backend": v.get("backend", ""),
                "precision": v.get("precision", ""),
                "mAP50-95": ev.get("map"),
                "mAP50-95 95% CI": f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else None,
                "mAP50": ev.get("map50"),
                "ΔmAP50-95 vs base": None if ev.get("map") is None or base_map is None else ev["map"] - base_map,
                "latency p50 ms": p50,
                "FPS end to end": be.get("fps_end_to_end"),
                "speedup vs base": None if p50 is None or base_ms is None else base_ms / p50,
                "params": be.get("params"),
                "GFLOPs": be.get("gflops"),
                "size MB": be.get("size_mb"),
            }
        )
    return out


def fmt(value, column: str) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, str):
        return value
    if column == "params":
        return f"{int(value):,}"
    if column.startswith("Δ"):
        return f"{value * 100:+.1f} pt"
    if column == "speedup vs base":
        return f"{value:.2f}x"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def write_report(runs: list, out: Path) -> dict:
    """Write out/report.md, out/report.html (images embedded) and out/report.csv; return their paths."""
    from yoloslim.report.html import render_html
    from yoloslim.report.plots import figures

    summaries = load_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    tables = [(s, rows(s)) for s in summaries]
    images = figures(summaries, out)
    paths = {"md": out / "report.md", "html": out / "report.html", "csv": out / "report.csv"}
    write_text_atomic(paths["md"], render_markdown(tables, images))
    write_text_atomic(paths["html"], render_html(tables, images))
    write_text_atomic(paths["csv"], render_csv(tables))
    return paths


def render_markdown(tables, images) -> str:
    lines = ["# yoloslim comparison report", ""]
    for summary, table in tables:
        lines += [
            f"## {summary['name']}",
            "",
            _context(summary),
            "",
            "| " + " | ".join(COLUMNS) + " |",
            "|" + "---|" * len(COLUMNS),
        ]
        lines += ["| " + " | ".join(fmt(r[c], c) for c in COLUMNS) + " |" for r in table]
        lines.append("")
    lines += [f"![{title}]({path.name})" for title, path in images]
    return "\n".join(lines) + "\n"


def render_csv(tables) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["run", *COLUMNS])
    for summary, table in tables:
        for r in table:
            writer.writerow([summary["name"], *("" if r[c] is None else r[c] for c in COLUMNS)])
    return buffer.getvalue()


def _context(summary: dict) -> str:
    env = summary.get("environment") or {}
    return (
        f"Data {summary.get('data', '?')}, imgsz {summary.get('imgsz', '?')}; measured on {env.get('cpu', '?')} "
        f"({env.get('cores', '?')} cores, {env.get('threads', '?')} threads pinned), TensorRT {env.get('TensorRT') or 'not installed'}. "
        "mAP intervals: 95% bootstrap over validation images."
    )
