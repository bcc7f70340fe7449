"""The comparison report: what a run achieved in one line, then every variant's accuracy and speed side by side, as
Markdown, self-contained HTML and CSV.

Input: run folders written by `yoloslim slim`, each with a summary.json:

    {"name": ..., "data": ..., "imgsz": ..., "environment": {"threads": 1, "more_threads": [N], ...},
     "variants": [{"name", "stage", "backend", "precision", "weights", "eval": {...} | null, "bench": {...} | null}],
     "prune": {"widths": {layer: [before, after]}, "latency": {...} | null} | null, "gamma_history": {...} | null}

Speed is timed at 1 thread, the figure CPUs and pruning tools are compared by, and at all cores (N) in a pass of its
own: a variant's bench holds the 1-thread figures ("model", "end_to_end", "fps_end_to_end") and the model alone at N
threads under "model_at". The table shows latency and speedup at both counts, FPS at 1 thread. A run made before slim
timed 1 thread has one count, environment["threads"], and renders with it.

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
  backend, so a variant that has none takes its stage's PyTorch figure), latency ratio at 1 thread followed by the
  one at N threads ("1.9x faster on ONNX Runtime at 1 thread (1.8x at 2)"), and the mAP50-95 change with its paired
  95% interval where the summary has one (the variant's eval["paired"]: {"against": reference name, "map": [change,
  low, high]}), else the plain difference.

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
    "ΔmAP50-95 paired 95% CI",
    "speedup vs base",  # a PER_THREADS column
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
# one figure per thread count the run was timed at (FPS at the first only, 1 thread): headed "..., 1 / 2 threads"
PER_THREADS = ("speedup vs base", "latency p50 ms", "FPS end to end")
NOT_MEASURED = "not measured"


def load_runs(runs: list) -> list[dict]:
    loaded = []
    for run in map(Path, runs):
        path = run / SUMMARY if run.is_dir() else run
        if not path.is_file():
            raise YoloslimError(f"{run} has no {SUMMARY}; pass run folders written by yoloslim slim")
        try:
            summary = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            summary = None
        if not isinstance(summary, dict) or "variants" not in summary:
            raise YoloslimError(f"{path} is not a yoloslim slim {SUMMARY}; pass run folders written by yoloslim slim")
        loaded.append(summary)
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


def thread_counts(summary: dict) -> list:
    """The thread counts the run's speed was timed at, the one of bench["model"] first."""
    env = summary.get("environment") or {}
    return [env.get("threads"), *env.get("more_threads", [])]


def _p50(v: dict) -> Optional[float]:
    """Model-alone p50 latency at the run's first thread count."""
    return (((v.get("bench") or {}).get("model")) or {}).get("p50_ms")


def _p50s(v: dict, counts: list) -> dict:
    """Model-alone p50 latency at each thread count: bench["model"] at the first, bench["model_at"] at the others."""
    bench = v.get("bench") or {}
    models = {counts[0]: bench.get("model"), **{int(n): m for n, m in (bench.get("model_at") or {}).items()}}
    return {n: (models.get(n) or {}).get("p50_ms") for n in counts}


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return None if numerator is None or not denominator else numerator / denominator


def _difference(value: Optional[float], ref_value: Optional[float]) -> Optional[float]:
    return None if value is None or ref_value is None else value - ref_value


def _paired_interval(variant: dict, ref: Optional[dict]) -> Optional[str]:
    """The paired interval of the mAP change in points, as the change beside it reads; blank for the base itself."""
    if ref is variant:
        return ""
    change = () if ref is None else map_change(variant, ref)
    return f"{change[1] * 100:+.1f} to {change[2] * 100:+.1f} pt" if len(change) == 3 else None


def rows(summary: dict) -> list[dict]:
    """One table row per variant, its deltas against its reference (see the module docstring); the PER_THREADS
    columns hold {thread count: figure}."""
    variants, counts = summary["variants"], thread_counts(summary)
    out = []
    for v in variants:
        ev, be = v.get("eval") or {}, v.get("bench") or {}
        ref = reference(variants, v)
        ci = ev.get("ci95", {}).get("map")
        p50s, ref_p50s = _p50s(v, counts), _p50s(ref or {}, counts)
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
                "ΔmAP50-95 paired 95% CI": _paired_interval(v, ref),
                "speedup vs base": None if ref is None else {n: _ratio(ref_p50s[n], p50s[n]) for n in counts},
                "latency p50 ms": p50s,
                "FPS end to end": {counts[0]: be.get("fps_end_to_end")},
                "params": be.get("params"),
                "GFLOPs": stage_gflops(variants, v),  # an ONNX file's are its checkpoint's
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
    counts = thread_counts(summary)
    p50s, ref_p50s = _p50s(model, counts), _p50s(ref, counts)
    return {
        "model": model["name"],
        "against": ref["name"],
        "backend": model.get("backend", ""),
        "threads": counts,
        "gflops_ratio": _ratio(stage_gflops(variants, ref), stage_gflops(variants, model)),
        "speedup": {n: _ratio(ref_p50s[n], p50s[n]) for n in counts},
        "map_change": map_change(model, ref),
    }


def _threads(counts: list) -> str:
    """'1 thread', '2 threads', '1 / 2 threads'."""
    return f"{' / '.join('?' if n is None else str(n) for n in counts)} thread{'' if counts == [1] else 's'}"


def _times(ratio: float, fewer: str, more: str) -> str:
    return f"{ratio:.1f}x {fewer}" if ratio >= 1 else f"{1 / ratio:.1f}x {more}"


def _speed(ratio: float, like: Optional[float] = None) -> str:
    """'1.9x faster' or '1.2x slower'; only '1.8x' where it goes the way the ratio `like` went."""
    if like is not None and (ratio >= 1) == (like >= 1):
        return f"{max(ratio, 1 / ratio):.1f}x"
    return _times(ratio, "faster", "slower")


def speed_phrase(speedups: dict, backend: str) -> str:
    """'1.9x faster on ONNX Runtime at 1 thread (1.8x at 2)': the first thread count's ratio, then the others'."""
    (first, ratio), *others = speedups.items()
    at = f" at {_threads([first])}" if first else ""
    more = [f"{_speed(r, like=ratio)} at {n}" for n, r in others if r]
    return f"{_speed(ratio)} on {backend}{at}" + (f" ({', '.join(more)})" if more else "")


def headline(summary: dict) -> str:
    """What the run achieved, in one line: '2.0x fewer GFLOPs, 1.9x faster on ONNX Runtime at 1 thread (1.8x at 2),
    -1.2 mAP50-95 points (paired 95% CI -2.0 to -0.4)'."""
    figures = headline_figures(summary)
    if figures is None:
        return "No finetuned model was timed against a base on the same backend; the table shows what was measured."
    parts = []
    if figures["gflops_ratio"]:
        parts.append(_times(figures["gflops_ratio"], "fewer GFLOPs", "more GFLOPs"))
    parts.append(speed_phrase(figures["speedup"], figures["backend"]))
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


def header(column: str, counts: list) -> str:
    """A column's heading in a run's table: a PER_THREADS column names its thread counts."""
    if column not in PER_THREADS:
        return column
    return f"{column}, {_threads(counts[:1] if column == 'FPS end to end' else counts)}"


def fmt(value, column: str) -> str:
    if value is None or isinstance(value, dict) and all(v is None for v in value.values()):
        return NOT_MEASURED
    if isinstance(value, dict):  # one figure per thread count
        return " / ".join(fmt(v, column) for v in value.values())
    if isinstance(value, str):
        return value
    if column == "params":
        return f"{int(value):,}"
    if column.startswith("Δ"):
        return f"{value * 100:+.1f} pt"
    if column == "speedup vs base":
        return f"{value:.2f}x"
    if column == "latency p50 ms":
        return f"{value:.2f}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def write_report(runs: list, out: Path) -> dict:
    """Write out/report.md, out/report.html (images embedded) and out/report.csv; return their paths."""
    from yoloslim.report.html import render_html
    from yoloslim.report.plots import figures

    summaries = load_runs(runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise YoloslimError(f"cannot create {out} ({e.strerror}); choose a writable --out") from None
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
        headers = [header(c, thread_counts(summary)) for c in COLUMNS]
        lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(fmt(r[c], c) for c in COLUMNS) + " |" for r in table]
        lines += ["", context(summary), ""]
        latency = prune_latency(summary)
        lines += [*latency, ""] if latency else []
    lines += [f"![{title}]({path.name})" for title, path in images]
    return "\n".join(lines) + "\n"


# The mAP change in the CSV is in points, as its paired interval beside it reads
CSV_POINTS = "ΔmAP50-95 vs base"


def csv_columns() -> list:
    """The CSV's header: one row per variant, a PER_THREADS column split into its 1-thread and N-thread figures."""
    split = [[f"{c}, 1 thread", f"{c}, N threads"] if c in PER_THREADS else [c] for c in COLUMNS]
    names = (f"{name} (points)" if name == CSV_POINTS else name for names in split for name in names)
    return ["run", "N threads", *names]


def _csv_cells(row: dict, column: str) -> list:
    if column == CSV_POINTS:
        return [None if row[column] is None else round(100 * row[column], 2)]
    if column not in PER_THREADS:
        return [row[column]]
    figures = row[column] or {}
    return [figures.get(1), next((v for n, v in figures.items() if n != 1), None)]


def render_csv(tables) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(csv_columns())
    for summary, table in tables:
        n = next((n for n in thread_counts(summary) if n != 1), None)
        for r in table:
            cells = [n, *(cell for c in COLUMNS for cell in _csv_cells(r, c))]
            writer.writerow([summary["name"], *("" if cell is None else cell for cell in cells)])
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
    env, counts = summary.get("environment") or {}, thread_counts(summary)
    passes = ", each count timed in a pass of its own" if len(counts) > 1 else ""
    return (
        f"Data {summary.get('data', '?')}, imgsz {summary.get('imgsz', '?')}; measured on {env.get('cpu', '?')} "
        f"({env.get('cores', '?')} cores, {_threads(counts)} pinned{passes}), "
        f"TensorRT {env.get('TensorRT') or 'not installed'}. "
        "Speedup: model-alone p50 latency of the base on the same backend and precision over the variant's "
        "(a reduced-precision variant against its backend's FP32 base, named in 'compared with'). "
        f"FPS: end to end (decode, letterbox, inference, NMS) at {_threads(counts[:1])}. "
        "mAP intervals: 95% bootstrap over validation images."
    )
