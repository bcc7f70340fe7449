"""The report's pictures: accuracy against speed (Pareto), widths per layer, gamma distribution per epoch.

They are drawn at PIXEL_RATIO image pixels per CSS pixel (100 CSS pixels per figure inch) and shown at their CSS size,
so they stay sharp on high-density screens, and their text keeps a legible size when a phone shrinks them to its width.
"""

from __future__ import annotations

from pathlib import Path

from yoloslim.utils.plots import plot_gamma_history, plot_widths, pyplot, save_figure

PIXEL_RATIO = 2
DPI = 100 * PIXEL_RATIO
# where a point's number may go, in points from the point, by preference: close points get numbers on different sides
NUMBER_OFFSETS = ((6, 4), (6, -12), (-13, 4), (-13, -12), (7, -4), (-14, -4), (6, 12), (-13, 12), (6, -20), (-13, -20))


def pareto_front(points: list) -> list:
    """The points no other point beats on both FPS and mAP, by increasing FPS."""
    front, best = [], -1.0
    for fps, value, label in sorted(points, key=lambda p: (-p[0], -p[1])):
        if value > best:
            front.append((fps, value, label))
            best = value
    return sorted(front)


def run_labels(summaries: list) -> list[str]:
    """Each run's short name: slim names a run "<folder>: <weights> on <data>"; runs of the same folder name (in two
    projects) are told apart by their position in the report, "slim (2)"."""
    names = [s["name"].split(":")[0] for s in summaries]
    return [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


def accuracy_speed_points(summaries: list) -> list:
    """(FPS end to end, mAP50-95, label, 95% interval or None) of every variant measured for both; the FPS is the
    run's first thread count's, 1 thread."""
    points = []
    for s, run in zip(summaries, run_labels(summaries)):
        for v in s["variants"]:
            ev, be = v.get("eval") or {}, v.get("bench") or {}
            if ev.get("map") is not None and be.get("fps_end_to_end"):
                label = v["name"] if len(summaries) == 1 else f"{run}: {v['name']}"
                points.append((be["fps_end_to_end"], ev["map"], label, ev.get("ci95", {}).get("map")))
    return points


def fps_label(summaries: list) -> str:
    """The x axis: FPS end to end, at the thread count of the runs' FPS (1 thread) where they share one."""
    from yoloslim.report import header, thread_counts

    firsts = {thread_counts(s)[0] for s in summaries}
    return header("FPS end to end", list(firsts)) if len(firsts) == 1 else "FPS end to end"


def marker_boxes(ax, points: list, half_width_pt: float = 4.0) -> list:
    """Display boxes of each point's marker and error bar, which numbers must not cover."""
    from matplotlib.transforms import Bbox

    half = half_width_pt * ax.figure.dpi / 72
    boxes = []
    for fps, value, _, ci in points:
        low, high = ci or (value, value)
        (x, y0), (_, y1) = ax.transData.transform([(fps, low), (fps, high)])
        boxes.append(Bbox.from_extents(x - half, y0 - half, x + half, y1 + half))
    return boxes


def number_points(ax, points: list, colors: list, obstacles: tuple = ()) -> list:
    """Write each point's number (1, 2, ...) beside it, at the first offset whose box overlaps no obstacle and no
    earlier number; returns the numbers' boxes (with a margin) in display pixels. The axes must have their final
    layout (draw the figure first)."""
    renderer = ax.figure.canvas.get_renderer()
    gap = 3 * ax.figure.dpi / 72  # two numbers that touch read as one: "1" beside "4" reads 14
    taken = []
    for i, ((x, y), color) in enumerate(zip(points, colors), 1):
        for offset in NUMBER_OFFSETS:
            number = ax.annotate(
                str(i), (x, y), textcoords="offset points", xytext=offset, fontsize=10, weight="bold", color=color
            )
            number.set_in_layout(False)  # placed after the layout; must not move it
            box = number.get_window_extent(renderer).padded(gap / 2)
            if not any(box.overlaps(other) for other in [*obstacles, *taken]) or offset == NUMBER_OFFSETS[-1]:
                break
            number.remove()
        taken.append(box)
    return taken


def plot_pareto(summaries: list, path: Path) -> bool:
    """mAP50-95 against FPS, each variant a numbered point, its name in the legend below (labels beside the points
    overlapped wherever two variants were close, and shrank to nothing on a phone)."""
    points = accuracy_speed_points(summaries)
    if not points:
        return False
    plt = pyplot()
    columns = 2 if max(len(p[2]) for p in points) <= 24 else 1  # two columns of long names overflow a phone's width
    legend_rows = -(-(len(points) + 1) // columns)
    fig, ax = plt.subplots(figsize=(4.4, 3.4 + 0.22 * legend_rows), dpi=DPI, layout="constrained")
    palette = plt.get_cmap("tab10").colors
    colors = [palette[i % len(palette)] for i in range(len(points))]
    for i, ((fps, value, label, ci), color) in enumerate(zip(points, colors), 1):
        err = [[value - ci[0]], [ci[1] - value]] if ci else None
        ax.errorbar(fps, value, yerr=err, fmt="o", ms=5, capsize=3, color=color, label=f"{i}  {label}")
    front = pareto_front([p[:3] for p in points])
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", lw=1, label="Pareto front")
    ax.set(xlabel=fps_label(summaries), ylabel="mAP50-95 (95% CI)", title="Accuracy against speed")
    ax.margins(0.15)
    fig.legend(loc="outside lower center", ncol=columns, fontsize=9, frameon=False, handletextpad=0.3)
    fig.canvas.draw()
    number_points(ax, [p[:2] for p in points], colors, obstacles=tuple(marker_boxes(ax, points)))
    save_figure(fig, path)
    return True


def plot_prune_widths(widths: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=DPI, layout="constrained")
    plot_widths(ax, widths)
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
            plot_gamma_history(s["gamma_history"], out / f"gamma-{i}.png", figsize=(5.5, 3.6), dpi=DPI)
            found.append((f"Gamma distribution during sparsity training, {s['name']}", out / f"gamma-{i}.png"))
    return found
