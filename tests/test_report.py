import json
import re
import shutil
import subprocess

import pytest

from yoloslim.report import COLUMNS, NO_BASE, headline, headline_figures, rows, write_report
from yoloslim.report.plots import marker_boxes, number_points, pareto_front, plot_pareto

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def variant(name, stage, backend, precision="fp32", m=None, p50=None, gflops=None):
    ev = None if m is None else {"map": m, "map50": m + 0.2, "ci95": {"map": [m - 0.03, m + 0.03]}}
    be = (
        None
        if p50 is None
        else {
            "fps_end_to_end": 1e3 / (p50 + 4.0),
            "model": {"p50_ms": p50},
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
    TensorRT rows were not measured, FP16 on a CPU is slower than FP32."""
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
        "environment": {"cpu": "test cpu", "cores": 2, "threads": 1, "TensorRT": None},
        "variants": [
            variant("base", "base", "PyTorch", m=0.747, p50=65.0, gflops=2.10),
            variant("sparse", "sparse", "PyTorch", m=0.610, p50=64.0, gflops=2.10),
            variant("pruned", "pruned", "PyTorch", m=0.550, p50=40.0, gflops=1.02),
            variant("finetuned", "finetuned", "PyTorch", m=0.735, p50=41.0, gflops=1.02),
            variant("base ONNX", "base", "ONNX Runtime", m=0.746, p50=10.0),
            variant("finetuned ONNX", "finetuned", "ONNX Runtime", m=0.734, p50=5.3),
            variant("finetuned FP16 ONNX", "finetuned", "ONNX Runtime", "fp16", m=0.733, p50=9.1),
            variant("finetuned INT8 Q/DQ", "finetuned", "ONNX Runtime", "int8", m=0.721, p50=4.2),
            variant("finetuned TensorRT FP16", "finetuned", "TensorRT FP16", "fp16"),
            variant("finetuned TensorRT INT8", "finetuned", "TensorRT INT8", "int8"),
        ],
        "prune": {"widths": {f"model.{i}.conv": [64, 32 + i] for i in range(20)}},
        "gamma_history": history,
    }


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(slim_summary()))
    return run


def by_name(summary: dict) -> dict:
    return {v["name"]: v for v in summary["variants"]}


def p50(v: dict) -> float:
    return v["bench"]["model"]["p50_ms"]


def test_speedups_are_against_the_base_on_the_same_backend():
    summary = slim_summary()
    v = by_name(summary)
    table = {r["variant"]: r for r in rows(summary)}
    assert table["base ONNX"]["speedup vs base"] == pytest.approx(1.0)
    assert table["base ONNX"]["ΔmAP50-95 vs base"] == pytest.approx(0.0)
    onnx = table["finetuned ONNX"]
    assert onnx["compared with"] == "base ONNX"
    assert onnx["speedup vs base"] == pytest.approx(p50(v["base ONNX"]) / p50(v["finetuned ONNX"]))
    assert onnx["ΔmAP50-95 vs base"] == pytest.approx(
        v["finetuned ONNX"]["eval"]["map"] - v["base ONNX"]["eval"]["map"]
    )
    torch = table["finetuned"]
    assert torch["compared with"] == "base"
    assert torch["speedup vs base"] == pytest.approx(p50(v["base"]) / p50(v["finetuned"]))


def test_reduced_precision_is_against_the_fp32_base_and_says_so():
    summary = slim_summary()
    v = by_name(summary)
    int8 = next(r for r in rows(summary) if r["variant"] == "finetuned INT8 Q/DQ")
    assert int8["compared with"] == "base ONNX (FP32)"
    assert int8["speedup vs base"] == pytest.approx(p50(v["base ONNX"]) / p50(v["finetuned INT8 Q/DQ"]))


def test_a_backend_without_a_base_has_no_speedup():
    trt = next(r for r in rows(slim_summary()) if r["variant"] == "finetuned TensorRT INT8")
    assert trt["compared with"] == NO_BASE
    assert trt["speedup vs base"] is None and trt["ΔmAP50-95 vs base"] is None and trt["mAP50-95"] is None


def test_headline_figures_come_from_the_summary():
    summary = slim_summary()
    v = by_name(summary)
    figures = headline_figures(summary)
    assert (figures["model"], figures["against"], figures["backend"]) == ("finetuned ONNX", "base ONNX", "ONNX Runtime")
    assert figures["threads"] == summary["environment"]["threads"]
    # ONNX files carry no GFLOPs: the same stage's PyTorch figure stands in
    assert figures["gflops_ratio"] == pytest.approx(v["base"]["bench"]["gflops"] / v["finetuned"]["bench"]["gflops"])
    assert figures["speedup"] == pytest.approx(p50(v["base ONNX"]) / p50(v["finetuned ONNX"]))
    change = v["finetuned ONNX"]["eval"]["map"] - v["base ONNX"]["eval"]["map"]
    assert figures["map_change"] == pytest.approx((change,))
    line = headline(summary)
    assert line == (
        f"{figures['gflops_ratio']:.1f}x fewer GFLOPs, {figures['speedup']:.1f}x faster on ONNX Runtime at 1 thread, "
        f"{change * 100:+.1f} mAP50-95 points"
    )


def test_headline_takes_the_paired_interval_and_the_thread_count():
    summary = slim_summary()
    summary["environment"]["threads"] = 4
    tuned = by_name(summary)["finetuned ONNX"]
    tuned["eval"]["paired"] = {"against": "base ONNX", "map": [-0.012, -0.02, -0.004]}
    assert headline(summary).endswith("at 4 threads, -1.2 mAP50-95 points (paired 95% CI -2.0 to -0.4)")
    tuned["eval"]["paired"]["against"] = "base"  # an interval against another model is not this change's
    assert "paired" not in headline(summary)


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
    paths = write_report([run_dir], tmp_path / "out")
    md = paths["md"].read_text()
    lines = [line for line in md.splitlines() if line and not line.startswith("#")]
    assert lines[0] == f"**{headline(slim_summary())}**"
    assert md.index("| variant |") < md.index("Data synthetic.yaml")
    assert "not measured" in md and "| finetuned ONNX |" in md and "pareto.png" in md
    csv_lines = paths["csv"].read_text().splitlines()
    assert len(csv_lines) == 1 + len(slim_summary()["variants"]) and csv_lines[0].split(",")[1:] == list(COLUMNS)


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
