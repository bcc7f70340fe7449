"""The prune report: per-layer widths, parameters, GFLOPs, file size, and the score histogram with the threshold."""

from __future__ import annotations

import math
from pathlib import Path

from yoloslim.utils.files import write_text_atomic


def plan_table(result) -> str:
    """Per-layer widths and totals as Markdown (also what --dry-run prints)."""
    rows = ["| layer | channels before | after | kept |", "| --- | ---: | ---: | ---: |"]
    for name, (before, after) in result.widths.items():
        rows.append(f"| {name} | {before} | {after} | {after / before:.0%} |")
    b, a = result.before, result.after
    summary = [
        "| | before | after | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| parameters | {b['params']:,} | {a['params']:,} | {a['params'] / b['params']:.3f} |",
        f"| GFLOPs at {result.config.imgsz} px | {b['gflops']:.3f} | {a['gflops']:.3f} | "
        f"{a['gflops'] / b['gflops']:.3f} |",
    ]
    threshold = "none" if result.threshold == -math.inf else f"{result.threshold:.4g}"
    head = (
        f"criterion {result.config.method}, threshold {threshold}, removed {result.removed_fraction:.1%} of prunable "
        f"channels after rounding to multiples of {result.config.round_to}"
    )
    return "\n".join([head, "", *summary, "", *rows])


def write_prune_report(result) -> Path:
    """Write <checkpoint>-report.md and -report.png beside the pruned checkpoint `result.out`; return the .md."""
    png = result.out.with_name(f"{result.out.stem}-report.png")
    md = png.with_suffix(".md")
    _plot(result, png)
    text = [
        f"# Prune report: {result.out.name}",
        "",
        f"Checkpoint size: {result.out.stat().st_size / 1e6:.2f} MB",
        "",
        plan_table(result),
        "",
        f"![scores and widths]({png.name})",
        "",
    ]
    write_text_atomic(md, "\n".join(text))
    return md


def _plot(result, path: Path) -> None:
    import numpy as np

    from yoloslim.utils.plots import plot_widths, pyplot, save_figure

    plt = pyplot()

    scores = np.concatenate([np.asarray(s) for s in result.scores]) if result.scores else np.zeros(1)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8), dpi=100)
    positive = scores[scores > 0]
    low = max(positive.min() if positive.size else 1e-6, 1e-6)
    bins = np.logspace(np.log10(low), np.log10(max(scores.max(), low * 10)), 60)
    ax1.hist(np.clip(scores, low, None), bins=bins, color="tab:blue")
    ax1.set(xscale="log", xlabel=f"channel score ({result.config.method})", ylabel="channels", title="Channel scores")
    if math.isfinite(result.threshold) and result.threshold > 0:
        ax1.axvline(result.threshold, color="tab:red", lw=2, label=f"threshold {result.threshold:.3g}")
        ax1.legend()
    plot_widths(ax2, result.widths)
    fig.tight_layout()
    save_figure(fig, path)
