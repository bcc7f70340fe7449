"""Plots shared by the stages and the report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from yoloslim.utils.files import atomic_path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Save atomically (a reader never sees a half-written PNG) and close."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        pyplot().close(fig)


def plot_gamma_history(history: dict, path: Path, figsize: tuple = (8, 4.5), dpi: int = 110) -> None:
    """Heat map of the |gamma| distribution per epoch with its quantiles: where a gap opens, a threshold fits."""
    plt = pyplot()
    epochs = [e["epoch"] + 1 for e in history["epochs"]]
    counts = np.array([e["counts"] for e in history["epochs"]], dtype=float).T
    edges = np.array(history["edges"])
    fig, ax = plt.subplots(figsize=figsize, dpi=dpi)
    y = np.append(np.maximum(edges, 1e-7), 20.0)  # zero bin drawn just below 1e-6
    x = np.append(np.array(epochs) - 0.5, epochs[-1] + 0.5)
    mesh = ax.pcolormesh(x, y, np.log1p(counts), cmap="viridis", shading="flat")
    for key, style in (("gamma/p10", ":"), ("gamma/p50", "-"), ("gamma/p90", "--")):
        ax.plot(epochs, [max(e[key], 1e-7) for e in history["epochs"]], "w" + style, lw=1.2, label=key.split("/")[1])
    ax.set(yscale="log", xlabel="epoch", ylabel="|gamma| (prunable BatchNorms)", title="BatchNorm gamma distribution")
    ax.legend(loc="lower left", fontsize=8)
    fig.colorbar(mesh, ax=ax, label="log(1 + channels)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_widths(ax, widths: dict) -> None:
    """Output channels per conv layer, before (grey) and after pruning (green)."""
    names = list(widths)
    x = np.arange(len(names))
    ax.bar(x, [widths[n][0] for n in names], color="lightgray", label="before")
    ax.bar(x, [widths[n][1] for n in names], color="tab:green", label="after")
    ax.set(xlabel="conv layer (model order)", ylabel="output channels", title="Widths per layer")
    ax.legend()
