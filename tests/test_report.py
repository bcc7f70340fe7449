import csv
import io
import json
import re
import shutil
import subprocess

import pytest

from yoloslim.report import NO_BASE, csv_columns, headline, headline_figures, rows, write_report
from yoloslim.report.plots import fps_label, marker_boxes, number_points, pareto_front, plot_pareto

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def variant(name, stage, backend, precision="fp32", m=None, p50=None, gflops=None):
    """p50: model-alone latency (ms) at 1 thread and at 2, as slim times them."""
    ev = None if m is None else {"map": m, "map50": m + 0.2, "ci95": {"map": [m - 0.03, m + 0.03]}}
    be = (
        None
        if p50 is None
        else {
            "fps_end_to_end": 1e3 / (p50[0] + 4.0),
            "model": {"p50_ms": p50[0]},
            "model_at": {"2": {"p50_ms": p50[1]}},
            "params": 1_000_000,
            "gflops": gflops,
            "size_mb": 4.0,
        }
    )
    return {
        "name": name,
        "stage": stage,
        "backend": backend,
        "precision": precision,
        "weights": None if be is None else f"{name}.pt",
        "eval": ev,
        "bench": be,
    }


def slim_summary() -> dict:
    """The variants `yoloslim slim` lists, with figures shaped like a real run's: ONNX files have no GFLOPs, the
    TensorRT rows were not measured, FP16 on a CPU is slower than FP32, a second thread gains the pruned model less."""
    history = {
        "edges": [0.0] + [10 ** (i / 8 - 6) for i in range(57)],
        "epochs": [
            {"epoch": e, "sr": 0.5, "counts": [e] * 57 + [1], "gamma/p10": 0.1, "gamma/p50": 0.5, "gamma/p90": 0.9}
            for e in range(3)
        ],
    }
    return {
        "name": "slim: sparse.pt on synthetic",
        "data": "synthetic.yaml",
        "imgsz": 320,
        "environment": {"cpu": "test cpu", "cores": 2, "threads": 1, "more_threads": [2], "TensorRT": None},
        "variants": [
            variant("base", "base", "PyTorch", m=0.747, p50=(65.0, 44.0), gflops=2.10),
            variant("sparse", "sparse", "PyTorch", m=0.610, p50=(64.0, 43.5), gflops=2.10),
            variant("pruned", "pruned", "PyTorch", m=0.550, p50=(40.0, 30.0), gflops=1.02),
            variant("finetuned", "finetuned", "PyTorch", m=0.735, p50=(41.0, 30.5), gflops=1.02),
            variant("base ONNX", "base", "ONNX Runtime", m=0.746, p50=(10.0, 6.8)),
            variant("finetuned ONNX", "finetuned", "ONNX Runtime", m=0.734, p50=(5.3, 4.1)),
            variant("finetuned FP16 ONNX", "finetuned", "ONNX Runtime", "fp16", m=0.733, p50=(9.1, 6.5)),
            variant("finetuned INT8 Q/DQ", "finetuned", "ONNX Runtime", "int8", m=0.721, p50=(4.2, 3.3)),
            variant("finetuned TensorRT FP16", "finetuned", "TensorRT FP16", "fp16"),
            variant("finetuned TensorRT INT8", "finetuned", "TensorRT INT8", "int8"),
        ],
        "prune": {"widths": {f"model.{i}.conv": [64, 32 + i] for i in range(20)}},
        "gamma_history": history,
    }


def old_summary() -> dict:
    """slim_summary as a run made before slim timed 1 thread wrote it: every figure at its one thread count, 2."""
    summary = slim_summary()
    summary["environment"]["threads"] = summary["environment"].pop("more_threads")[0]
    for v in summary["variants"]:
        if v["bench"]:
            v["bench"]["model"] = v["bench"].pop("model_at")["2"]
    return summary


def write_run(folder, summary: dict):
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "run", slim_summary())


def by_name(summary: dict) -> dict:
    return {v["name"]: v for v in summary["variants"]}


def p50(v: dict, threads: int = 1) -> float:
    return v["bench"]["model"]["p50_ms"] if threads == 1 else v["bench"]["model_at"][str(threads)]["p50_ms"]


def speedups(summary: dict, name: str, against: str) -> dict:
    """{1: speedup at 1 thread, 2: at 2 threads} of variant `name` over `against`, from the summary's latencies."""
    v = by_name(summary)
    return {n: p50(v[against], n) / p50(v[name], n) for n in (1, 2)}


def test_speedups_are_against_the_base_on_the_same_backend():
    summary = slim_summary()
    v = by_name(summary)
    table = {r["variant"]: r for r in rows(summary)}
    assert table["base ONNX"]["speedup vs base"] == pytest.approx({1: 1.0, 2: 1.0})
    assert table["base ONNX"]["ΔmAP50-95 vs base"] == pytest.approx(0.0)
    onnx = table["finetuned ONNX"]
    assert onnx["compared with"] == "base ONNX"
    assert onnx["speedup vs base"] == pytest.approx(speedups(summary, "finetuned ONNX", "base ONNX"))
    assert onnx["latency p50 ms"] == {1: p50(v["finetuned ONNX"]), 2: p50(v["finetuned ONNX"], 2)}
    assert onnx["FPS end to end"] == {1: v["finetuned ONNX"]["bench"]["fps_end_to_end"]}
    assert onnx["ΔmAP50-95 vs base"] == pytest.approx(
        v["finetuned ONNX"]["eval"]["map"] - v["base ONNX"]["eval"]["map"]
    )
    torch = table["finetuned"]
    assert torch["compared with"] == "base"
    assert torch["speedup vs base"] == pytest.approx(speedups(summary, "finetuned", "base"))


def test_reduced_precision_is_against_the_fp32_base_and_says_so():
    summary = slim_summary()
    int8 = next(r for r in rows(summary) if r["variant"] == "finetuned INT8 Q/DQ")
    assert int8["compared with"] == "base ONNX (FP32)"
    assert int8["speedup vs base"] == pytest.approx(speedups(summary, "finetuned INT8 Q/DQ", "base ONNX"))


def test_a_backend_without_a_base_has_no_speedup():
    trt = next(r for r in rows(slim_summary()) if r["variant"] == "finetuned TensorRT INT8")
    assert trt["compared with"] == NO_BASE
    assert trt["speedup vs base"] is None and trt["ΔmAP50-95 vs base"] is None and trt["mAP50-95"] is None


def test_headline_figures_come_from_the_summary():
    summary = slim_summary()
    v = by_name(summary)
    figures = headline_figures(summary)
    assert (figures["model"], figures["against"], figures["backend"]) == ("finetuned ONNX", "base ONNX", "ONNX Runtime")
    assert figures["threads"] == [1, 2]
    # ONNX files carry no GFLOPs: the same stage's PyTorch figure stands in
    assert figures["gflops_ratio"] == pytest.approx(v["base"]["bench"]["gflops"] / v["finetuned"]["bench"]["gflops"])
    speedup = speedups(summary, "finetuned ONNX", "base ONNX")
    assert figures["speedup"] == pytest.approx(speedup)
    change = v["finetuned ONNX"]["eval"]["map"] - v["base ONNX"]["eval"]["map"]
    assert figures["map_change"] == pytest.approx((change,))
    line = headline(summary)
    assert line == (
        f"{figures['gflops_ratio']:.1f}x fewer GFLOPs, {speedup[1]:.1f}x faster on ONNX Runtime at 1 thread "
        f"({speedup[2]:.1f}x at 2), {change * 100:+.1f} mAP50-95 points"
    )


def test_headline_takes_the_paired_interval_and_the_thread_counts():
    summary = slim_summary()
    speedup = speedups(summary, "finetuned ONNX", "base ONNX")
    summary["environment"]["more_threads"] = [4]  # a run given threads=4
    for v in summary["variants"]:
        if v["bench"]:
            v["bench"]["model_at"] = {"4": v["bench"]["model_at"].pop("2")}
    tuned = by_name(summary)["finetuned ONNX"]
    tuned["eval"]["paired"] = {"against": "base ONNX", "map": [-0.012, -0.02, -0.004]}
    assert headline(summary).endswith(
        f"at 1 thread ({speedup[2]:.1f}x at 4), -1.2 mAP50-95 points (paired 95% CI -2.0 to -0.4)"
    )
    tuned["eval"]["paired"]["against"] = "base"  # an interval against another model is not this change's
    assert "paired" not in headline(summary)
    # four threads that gain the base more than the pruned model: slower there, and said so
    tuned["bench"]["model_at"]["4"]["p50_ms"] = 1.1 * p50(by_name(summary)["base ONNX"], 4)
    assert f"{speedup[1]:.1f}x faster on ONNX Runtime at 1 thread (1.1x slower at 4)," in headline(summary)


def test_a_run_timed_at_one_thread_only_says_so_once():
    summary = slim_summary()
    del summary["environment"]["more_threads"]
    for v in summary["variants"]:
        if v["bench"]:
            del v["bench"]["model_at"]
    speedup = speedups(slim_summary(), "finetuned ONNX", "base ONNX")[1]
    assert f"{speedup:.1f}x faster on ONNX Runtime at 1 thread, " in headline(summary)
    onnx = next(r for r in rows(summary) if r["variant"] == "finetuned ONNX")
    assert onnx["speedup vs base"] == pytest.approx({1: speedup})


def test_a_summary_written_before_slim_timed_one_thread_still_renders(tmp_path):
    old, new = old_summary(), slim_summary()
    speedup = speedups(new, "finetuned ONNX", "base ONNX")[2]  # the old run's one figure: at 2 threads
    assert headline_figures(old)["threads"] == [2]
    assert f"{speedup:.1f}x faster on ONNX Runtime at 2 threads, " in headline(old) and "at 1 thread" not in headline(
        old
    )
    onnx = next(r for r in rows(old) if r["variant"] == "finetuned ONNX")
    assert onnx["speedup vs base"] == pytest.approx({2: speedup})
    # `yoloslim report` compares runs: an old one beside a new one, in one report
    runs = [write_run(tmp_path / "old", old), write_run(tmp_path / "new", new)]
    paths = write_report(runs, tmp_path / "out")
    md = paths["md"].read_text()
    assert "| speedup vs base, 2 threads |" in md and "| speedup vs base, 1 / 2 threads |" in md
    assert "(2 cores, 2 threads pinned)" in md and "1 / 2 threads pinned, each count timed in a pass of its own" in md
    table = [dict(zip(csv_columns(), line)) for line in csv.reader(io.StringIO(paths["csv"].read_text()))][1:]
    old_row, new_row = (
        next(r for r in table if r["variant"] == "finetuned ONNX" and r["run"] == s["name"]) for s in (old, new)
    )
    assert old_row["N threads"] == "2" and old_row["speedup vs base, 1 thread"] == ""
    assert float(old_row["speedup vs base, N threads"]) == pytest.approx(speedup)
    assert old_row["FPS end to end, 1 thread"] == "" and float(old_row["FPS end to end, N threads"]) > 0
    assert fps_label([old, new]) == "FPS end to end" and fps_label([old]) == "FPS end to end, 2 threads"


def test_headline_falls_back_to_pytorch_and_says_when_nothing_was_timed():
    summary = slim_summary()
    by_name(summary)["finetuned ONNX"]["bench"] = None
    assert headline_figures(summary)["backend"] == "PyTorch"
    for v in summary["variants"]:
        v["bench"] = None
    assert headline_figures(summary) is None and "No finetuned model was timed" in headline(summary)


def test_pareto_front():
    points = [(10, 0.5, "a"), (20, 0.4, "b"), (15, 0.3, "c"), (30, 0.2, "d")]
    assert [p[2] for p in pareto_front(points)] == ["a", "b", "d"]


def test_close_points_get_numbers_that_cover_no_number_and_no_marker(tmp_path):
    from yoloslim.utils.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    points = [
        (100.0, 0.5, "a", [0.49, 0.51]),
        (100.5, 0.501, "b", None),
        (101.0, 0.499, "c", None),
        (200, 0.3, "d", None),
    ]
    ax.plot([p[0] for p in points], [p[1] for p in points], "o")
    fig.canvas.draw()
    markers = marker_boxes(ax, points)
    boxes = number_points(ax, [p[:2] for p in points], ["k"] * len(points), obstacles=tuple(markers))
    plt.close(fig)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in [*boxes[i + 1 :], *markers])
    assert plot_pareto([slim_summary()], tmp_path / "pareto.png")


def test_markdown_leads_with_the_headline_and_csv_keeps_the_table(run_dir, tmp_path):
    summary = slim_summary()
    paths = write_report([run_dir], tmp_path / "out")
    md = paths["md"].read_text()
    lines = [line for line in md.splitlines() if line and not line.startswith("#")]
    assert lines[0] == f"**{headline(summary)}**"
    assert md.index("| variant |") < md.index("Data synthetic.yaml")
    assert "not measured" in md and "| finetuned ONNX |" in md and "pareto.png" in md
    # both thread counts side by side; FPS at 1 thread
    speedup = speedups(summary, "finetuned ONNX", "base ONNX")
    assert "| speedup vs base, 1 / 2 threads |" in md and f"| {speedup[1]:.2f}x / {speedup[2]:.2f}x |" in md
    assert "| latency p50 ms, 1 / 2 threads |" in md and "| FPS end to end, 1 thread |" in md
    assert fps_label([summary]) == "FPS end to end, 1 thread"
    table = list(csv.reader(io.StringIO(paths["csv"].read_text())))
    assert len(table) == 1 + len(summary["variants"]) and table[0] == csv_columns()
    row = dict(zip(table[0], next(r for r in table if r[csv_columns().index("variant")] == "finetuned ONNX")))
    assert row["N threads"] == "2"
    assert float(row["speedup vs base, 1 thread"]) == pytest.approx(speedup[1])
    assert float(row["speedup vs base, N threads"]) == pytest.approx(speedup[2])
    assert float(row["latency p50 ms, N threads"]) == pytest.approx(p50(by_name(summary)["finetuned ONNX"], 2))
    change = rows(summary)[[r["variant"] for r in rows(summary)].index("finetuned ONNX")]["ΔmAP50-95 vs base"]
    assert float(row["ΔmAP50-95 vs base (points)"]) == pytest.approx(100 * change, abs=0.01)  # as the interval reads


# Chromium keeps a headless window at least 500 px wide, so the report is rendered in a 390 px frame (a phone).
PROBE = """<!doctype html><html><body style="margin:0">
<iframe id="f" style="width:390px;height:844px;border:0"></iframe><pre id="probe"></pre>
<script>
const f = document.getElementById('f');
f.onload = () => {
  const d = f.contentDocument, w = f.contentWindow;
  const imgs = [...d.images];
  const external = w.performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:'));
  const headline = d.querySelector('p.headline');
  document.getElementById('probe').textContent = JSON.stringify({
    rows: d.querySelectorAll('table.variants tbody tr').length,
    images: imgs.length,
    decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    external: external,
    headline: headline ? headline.textContent : null,
    headlineAboveTable: headline ? headline.getBoundingClientRect().bottom
      <= d.querySelector('table.variants').getBoundingClientRect().top : false,
    headlineRight: headline ? headline.getBoundingClientRect().right : null,
    widest: Math.max(...[...d.body.children].map(e => e.getBoundingClientRect().right)),
    scrollWidth: d.documentElement.scrollWidth,
    innerWidth: w.innerWidth,
  });
};
f.srcdoc = REPORT;
</script></body></html>
"""


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_html_renders_in_chromium_on_a_phone(run_dir, tmp_path):
    paths = write_report([run_dir], tmp_path / "out")
    html = paths["html"].read_text()
    assert "http://" not in html and "https://" not in html
    probe = tmp_path / "out" / "probe.html"
    probe.write_text(PROBE.replace("REPORT", json.dumps(html).replace("</", "<\\/")))
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=390,844",
            "--virtual-time-budget=5000",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert found and found.group(1), result.stderr[-2000:]
    state = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert state["rows"] == len(slim_summary()["variants"])
    assert state["images"] == 3 and state["decoded"] == 3
    assert state["external"] == []
    assert state["headline"] == headline(slim_summary()) and state["headlineAboveTable"]
    assert state["innerWidth"] == 390 and state["scrollWidth"] <= state["innerWidth"]
    assert state["headlineRight"] <= state["innerWidth"] and state["widest"] <= state["innerWidth"]


def test_every_row_has_its_gflops_and_its_paired_interval():
    """An ONNX file's GFLOPs are its checkpoint's (bench counts only checkpoints); each change shows the paired
    interval evaluation stored, and none where there is no pair."""
    summary = slim_summary()
    tuned = by_name(summary)["finetuned ONNX"]
    tuned["eval"]["paired"] = {"against": "base ONNX", "map": [-0.012, -0.02, -0.004]}
    table = {r["variant"]: r for r in rows(summary)}
    assert table["finetuned ONNX"]["GFLOPs"] == 1.02 and table["base ONNX"]["GFLOPs"] == 2.10
    assert table["finetuned ONNX"]["ΔmAP50-95 paired 95% CI"] == "-2.0 to -0.4 pt"  # in points, as the change
    assert table["base ONNX"]["ΔmAP50-95 paired 95% CI"] == ""
    assert table["finetuned FP16 ONNX"]["ΔmAP50-95 paired 95% CI"] is None  # evaluated without a pair


@pytest.mark.parametrize("content", ["not json", '{"name": "x"}', "[1, 2]"])
def test_a_file_that_is_not_a_slim_summary_is_one_line(content, tmp_path):
    from yoloslim.utils.errors import YoloslimError

    (tmp_path / "summary.json").write_text(content)
    with pytest.raises(YoloslimError, match="is not a yoloslim slim summary.json"):
        write_report([tmp_path], tmp_path / "report")


def test_runs_of_the_same_name_keep_apart_in_the_plot():
    from yoloslim.report.plots import accuracy_speed_points

    labels = {p[2] for p in accuracy_speed_points([slim_summary(), slim_summary()])}
    assert "slim (1): finetuned ONNX" in labels and "slim (2): finetuned ONNX" in labels
