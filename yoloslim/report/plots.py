"""The report's pictures: accuracy against speed (Pareto), widths per layer, gamma distribution per epoch."""

from __future__ import annotations

from pathlib import Path

from yoloslim.utils.plots import plot_gamma_history, plot_widths, pyplot, save_figure


def pareto_front(points: list) -> list:
    """The points no other point beats on both FPS and mAP, by increasing FPS."""
    front, best = [], -1.0
    for fps, value, label in sorted(points, key=lambda p: (-p[0], -p[1])):
        if value > best:
            front.append((fps, value, label))
            best = value
    return sorted(front)


def plot_pareto(summaries: list, path: Path) -> bool:
    points = []
    for s in summaries:
        for v in s["variants"]:
            ev, be = v.get("eval") or {}, v.get("bench") or {}
            if ev.get("map") is not None and be.get("fps_end_to_end"):
                points.append((be["fps_end_to_end"], ev["map"], v["name"], ev.get("ci95", {}).get("map")))
    if not points:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for fps, value, label, ci in points:
        err = [[value - ci[0]], [ci[1] - value]] if ci else None
        ax.errorbar(fps, value, yerr=err, fmt="o", capsize=3)
        ax.annotate(label, (fps, value), textcoords="offset points", xytext=(5, 5), fontsize=8)
    front = pareto_front([p[:3] for p in points])
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", lw=1, label="Pareto front")
    ax.set(xlabel="FPS, end to end", ylabel="mAP50-95 (95% CI)", title="Accuracy against speed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plot_prune_widths(widths: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.5), dpi=110)
    plot_widths(ax, widths)
    fig.tight_layout()
    save_figure(fig, path)


def figures(summaries: list, out: Path) -> list:
    """(title, png path) of every picture the runs allow."""
    found = []
    if plot_pareto(summaries, out / "pareto.png"):
        found.append(("Accuracy against speed", out / "pareto.png"))
    for i, s in enumerate(summaries):
        if (s.get("prune") or {}).get("widths"):
            plot_prune_widths(s["prune"]["widths"], out / f"widths-{i}.png")
            found.append((f"Widths per layer, {s['name']}", out / f"widths-{i}.png"))
        if s.get("gamma_history"):
            plot_gamma_history(s["gamma_history"], out / f"gamma-{i}.png")
            found.append((f"Gamma distribution during sparsity training, {s['name']}", out / f"gamma-{i}.png"))
    return found
