import json
import re
import shutil
import subprocess

import pytest

from yoloslim.report import COLUMNS, rows, write_report
from yoloslim.report.plots import pareto_front

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def variant(name, stage, backend, m=None, fps=None, p50=None):
    ev = None if m is None else {"map": m, "map50": m + 0.2, "ci95": {"map": [m - 0.03, m + 0.03]}}
    be = (
        None
        if fps is None
        else {"fps_end_to_end": fps, "model": {"p50_ms": p50}, "params": 1_000_000, "gflops": 2.0, "size_mb": 4.0}
    )
    return {
        "name": name,
        "stage": stage,
        "backend": backend,
        "precision": "fp32",
        "weights": f"{name}.pt",
        "eval": ev,
        "bench": be,
    }


@pytest.fixture
def run_dir(tmp_path):
    history = {
        "edges": [0.0] + [10 ** (i / 8 - 6) for i in range(57)],
        "epochs": [
            {"epoch": e, "sr": 0.5, "counts": [e] * 57 + [1], "gamma/p10": 0.1, "gamma/p50": 0.5, "gamma/p90": 0.9}
            for e in range(3)
        ],
    }
    summary = {
        "name": "synthetic demo",
        "data": "synthetic.yaml",
        "imgsz": 320,
        "environment": {"cpu": "test cpu", "cores": 2, "threads": 2, "TensorRT": None},
        "variants": [
            variant("base", "base", "PyTorch", 0.40, 20.0, 50.0),
            variant("pruned", "pruned", "PyTorch", 0.30, 35.0, 25.0),
            variant("finetuned", "finetuned", "ONNX Runtime", 0.39, 40.0, 20.0),
            variant("finetuned-int8", "finetuned", "TensorRT INT8"),
        ],
        "prune": {"widths": {f"model.{i}.conv": [64, 32 + i] for i in range(20)}},
        "gamma_history": history,
    }
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_rows_deltas_and_not_measured(run_dir):
    table = rows(json.loads((run_dir / "summary.json").read_text()))
    assert table[2]["ΔmAP50-95 vs base"] == pytest.approx(-0.01) and table[2]["speedup vs base"] == pytest.approx(2.5)
    assert table[3]["mAP50-95"] is None and table[3]["latency p50 ms"] is None


def test_pareto_front():
    points = [(10, 0.5, "a"), (20, 0.4, "b"), (15, 0.3, "c"), (30, 0.2, "d")]
    assert [p[2] for p in pareto_front(points)] == ["a", "b", "d"]


def test_markdown_and_csv(run_dir, tmp_path):
    paths = write_report([run_dir], tmp_path / "out")
    md = paths["md"].read_text()
    assert "not measured" in md and "| finetuned |" in md and "pareto.png" in md
    csv_lines = paths["csv"].read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].split(",")[1:] == list(COLUMNS)


# Chromium keeps a headless window at least 500 px wide, so the report is rendered in a 390 px frame (a phone).
PROBE = """<!doctype html><html><body style="margin:0">
<iframe id="f" style="width:390px;height:844px;border:0"></iframe><pre id="probe"></pre>
<script>
const f = document.getElementById('f');
f.onload = () => {
  const d = f.contentDocument, w = f.contentWindow;
  const imgs = [...d.images];
  const external = w.performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:'));
  document.getElementById('probe').textContent = JSON.stringify({
    rows: d.querySelectorAll('table.variants tbody tr').length,
    images: imgs.length,
    decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    external: external,
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
    state = json.loads(found.group(1).replace("&quot;", '"'))
    assert state["rows"] == 4
    assert state["images"] == 3 and state["decoded"] == 3
    assert state["external"] == []
    assert state["innerWidth"] == 390 and state["scrollWidth"] <= state["innerWidth"]
