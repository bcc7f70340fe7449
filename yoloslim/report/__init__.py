"""The comparison report: what a run achieved in one line, then every variant's accuracy and speed side by side, as
Markdown, self-contained HTML and CSV.

Input: run folders written by `yoloslim slim`, each with a summary.json:

    {"name": ..., "data": ..., "imgsz": ..., "environment": {"threads": ..., ...},
     "variants": [{"name", "stage", "backend", "precision", "weights", "eval": {...} | null, "bench": {...} | null}],
     "prune": {"widths": {layer: [before, after]}, "latency": {...} | null} | null, "gamma_history": {...} | null}

A run pruned with a latency table (yoloslim.prune.latency) states its latency target, what the table predicted for the
pruned model and what was measured of it, under the table.

What each variant is compared with, so that a ratio measures one thing:

- A variant's speedup (model-alone p50 latency of the reference over its own) and its mAP50-95 change are against
  the base variant (stage "base") on the same backend and precision: "finetuned ONNX" against "base ONNX", never
  against the PyTorch base, whose ratio would mix the backend's gain with the pruning's.
- A reduced-precision variant (FP16, INT8) has no base of its precision; it is compared with the same backend's FP32
  base, and its "compared with" cell says so ("base ONNX (FP32)"): its ratio is pruning and precision together.
- A variant whose backend has no base (TensorRT in a run made without TensorRT) has no speedup and no change; its
  "compared with" cell says "no base on this backend".
- The headline, the line read first, takes the finetuned FP32 model against the base FP32 model on a runtime backend
  (ONNX Runtime before PyTorch, where both were timed): GFLOPs ratio (an architecture's GFLOPs do not depend on its
  backend, so a variant that has none takes its stage's PyTorch figure), latency ratio with the run's thread count,
  and the mAP50-95 change with its paired 95% interval where the summary has one (the variant's eval["paired"]:
  {"against": reference name, "map": [change, low, high]}), else the plain difference.

A figure that was not measured on the machine that made the run (TensorRT on a host without a GPU) reads
"not measured".
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Optional

from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.files import write_text_atomic

SUMMARY = "summary.json"
NO_BASE = "no base on this backend"
COLUMNS = (  # what a reader compares first comes first: a phone shows the first few columns without scrolling
    "variant",
    "mAP50-95",
    "ΔmAP50-95 vs base",
    "speedup vs base",
    "compared with",
    "backend",
    "precision",
    "mAP50-95 95% CI",
    "mAP50",
    "latency p50 ms",
    "FPS end to end",
    "params",
    "GFLOPs",
    "size MB",
    "stage",
)


def load_runs(runs: list) -> list[dict]:
    loaded = []
    for run in map(Path, runs):
        path = run / SUMMARY if run.is_dir() else run
        if not path.is_file():
            raise YoloslimError(f"{run} has no {SUMMARY}; pass run folders written by yoloslim slim")
        loaded.append(json.loads(path.read_text()))
    return loaded


def reference(variants: list, variant: dict) -> Optional[dict]:
    """The base variant that `variant` is compared with: same backend and precision, else the backend's FP32 base."""
    bases = [b for b in variants if b.get("stage") == "base" and b.get("backend") == variant.get("backend")]
    same = [b for b in bases if b.get("precision") == variant.get("precision")]
    fp32 = [b for b in bases if b.get("precision") == "fp32"]
    return (same or fp32 or [None])[0]


def reference_label(variant: dict, ref: Optional[dict]) -> str:
    if ref is None:
        return NO_BASE
    if ref.get("precision") != variant.get("precision"):
        return f"{ref['name']} ({ref['precision'].upper()})"
    return ref["name"]


def _map(v: dict) -> Optional[float]:
    return (v.get("eval") or {}).get("map")


def _p50(v: dict) -> Optional[float]:
    return (((v.get("bench") or {}).get("model")) or {}).get("p50_ms")


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return None if numerator is None or not denominator else numerator / denominator


def _difference(value: Optional[float], ref_value: Optional[float]) -> Optional[float]:
    return None if value is None or ref_value is None else value - ref_value


def rows(summary: dict) -> list[dict]:
    """One table row per variant, its deltas against its reference (see the module docstring)."""
    variants = summary["variants"]
    out = []
    for v in variants:
        ev, be = v.get("eval") or {}, v.get("bench") or {}
        ref = reference(variants, v)
        ci = ev.get("ci95", {}).get("map")
        out.append(
            {
                "variant": v["name"],
                "stage": v.get("stage", ""),
                "backend": v.get("backend", ""),
                "precision": (v.get("precision") or "").upper(),
                "mAP50-95": ev.get("map"),
                "mAP50-95 95% CI": f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else None,
                "mAP50": ev.get("map50"),
                "compared with": reference_label(v, ref),
                "ΔmAP50-95 vs base": None if ref is None else _difference(_map(v), _map(ref)),
                "speedup vs base": None if ref is None else _ratio(_p50(ref), _p50(v)),
                "latency p50 ms": _p50(v),
                "FPS end to end": be.get("fps_end_to_end"),
                "params": be.get("params"),
                "GFLOPs": be.get("gflops"),
                "size MB": be.get("size_mb"),
            }
        )
    return out


def headline_pair(variants: list) -> Optional[tuple]:
    """(finetuned FP32 variant, its same-precision base), both timed; a runtime backend before PyTorch."""
    pairs = []
    for v in variants:
        ref = reference(variants, v)
        if v.get("stage") == "finetuned" and v.get("precision") == "fp32" and ref and _p50(v) and _p50(ref):
            pairs.append((v, ref))
    pairs.sort(key=lambda pair: pair[0].get("backend") == "PyTorch")
    return pairs[0] if pairs else None


def stage_gflops(variants: list, variant: dict) -> Optional[float]:
    """The variant's GFLOPs, or those of its stage measured on another backend (the same architecture)."""
    same_stage = [v for v in variants if v.get("stage") == variant.get("stage") and v.get("precision") == "fp32"]
    found = [(v.get("bench") or {}).get("gflops") for v in [variant, *same_stage]]
    return next((g for g in found if g), None)


def map_change(variant: dict, ref: dict) -> tuple:
    """(change, low, high) of mAP50-95 against ref: the paired interval when the summary has it, else (change,)."""
    paired = (variant.get("eval") or {}).get("paired") or {}
    if paired.get("against") == ref["name"] and paired.get("map"):
        return tuple(paired["map"])
    change = _difference(_map(variant), _map(ref))
    return () if change is None else (change,)


def headline_figures(summary: dict) -> Optional[dict]:
    """The figures of the headline, all read from the summary; None when no finetuned model was timed against a base."""
    variants = summary["variants"]
    pair = headline_pair(variants)
    if pair is None:
        return None
    model, ref = pair
    return {
        "model": model["name"],
        "against": ref["name"],
        "backend": model.get("backend", ""),
        "threads": (summary.get("environment") or {}).get("threads"),
        "gflops_ratio": _ratio(stage_gflops(variants, ref), stage_gflops(variants, model)),
        "speedup": _ratio(_p50(ref), _p50(model)),
        "map_change": map_change(model, ref),
    }


def _count(n, noun: str) -> str:
    return f"{'?' if n is None else n} {noun}{'' if n == 1 else 's'}"


def _times(ratio: float, fewer: str, more: str) -> str:
    return f"{ratio:.1f}x {fewer}" if ratio >= 1 else f"{1 / ratio:.1f}x {more}"


def headline(summary: dict) -> str:
    """What the run achieved, in one line: '2.0x fewer GFLOPs, 1.9x faster on ONNX Runtime at 1 thread, -1.2
    mAP50-95 points (paired 95% CI -2.0 to -0.4)'."""
    figures = headline_figures(summary)
    if figures is None:
        return "No finetuned model was timed against a base on the same backend; the table shows what was measured."
    parts = []
    if figures["gflops_ratio"]:
        parts.append(_times(figures["gflops_ratio"], "fewer GFLOPs", "more GFLOPs"))
    at = f" at {_count(figures['threads'], 'thread')}" if figures["threads"] else ""
    parts.append(_times(figures["speedup"], "faster", "slower") + f" on {figures['backend']}{at}")
    change = figures["map_change"]
    if change:
        interval = f" (paired 95% CI {change[1] * 100:+.1f} to {change[2] * 100:+.1f})" if len(change) == 3 else ""
        parts.append(f"{change[0] * 100:+.1f} mAP50-95 points{interval}")
    return ", ".join(parts)


def headline_basis(summary: dict) -> str:
    """Which two variants the headline compares, and how."""
    figures = headline_figures(summary)
    if figures is None:
        return ""
    return (
        f"{figures['model']} against {figures['against']}, both FP32 on {figures['backend']}; "
        "speed is the model alone, p50 latency."
    )


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
        basis = headline_basis(summary)
        lines += [f"## {summary['name']}", "", f"**{headline(summary)}**", ""] + ([basis, ""] if basis else [])
        lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(fmt(r[c], c) for c in COLUMNS) + " |" for r in table]
        lines += ["", context(summary), ""]
        latency = prune_latency(summary)
        lines += [*latency, ""] if latency else []
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


def prune_latency(summary: dict) -> list:
    """The pruned model's latency target, predicted and measured latency, one line each; none without a table."""
    latency = (summary.get("prune") or {}).get("latency")
    if not latency:
        return []
    from yoloslim.prune.latency import latency_lines

    lines = latency_lines(latency)
    return [f"Pruned model, {lines[0]}", *lines[1:]]


def context(summary: dict) -> str:
    env = summary.get("environment") or {}
    return (
        f"Data {summary.get('data', '?')}, imgsz {summary.get('imgsz', '?')}; measured on {env.get('cpu', '?')} "
        f"({env.get('cores', '?')} cores, {_count(env.get('threads'), 'thread')} pinned), "
        f"TensorRT {env.get('TensorRT') or 'not installed'}. "
        "Speedup: model-alone p50 latency of the base on the same backend and precision over the variant's "
        "(a reduced-precision variant against its backend's FP32 base, named in 'compared with'). "
        "mAP intervals: 95% bootstrap over validation images."
    )
