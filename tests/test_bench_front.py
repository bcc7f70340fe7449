"""The accuracy-latency front: every arm reaches the same predicted latency, and the whole tool runs and resumes."""

import importlib.util
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool():
    if "bench_front" not in sys.modules:
        sys.path.insert(0, str(TOOLS))
        spec = importlib.util.spec_from_file_location("bench_front", TOOLS / "bench_front.py")
        sys.modules["bench_front"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["bench_front"])
    return sys.modules["bench_front"]


@pytest.mark.parametrize(
    "layout",
    [
        {"scale": "n", "scales": {"n": [0.33, 0.25, 1024], "s": [0.33, 0.5, 1024]}, "nc": 1},
        {"width_multiple": 0.25, "depth_multiple": 0.33, "nc": 1},
    ],
)
def test_the_scratch_width_is_the_widest_predicted_within_the_target(layout):
    tool = _tool()

    def width(spec):
        return spec["scales"]["n"][1] if "scales" in spec else spec["width_multiple"]

    def predict(spec):  # a latency that grows with the width, 1.0 at the layout's own
        return 0.2 + 0.8 * (width(spec) / 0.25) ** 2

    chosen = tool.width_multiple_for(layout, predict, target=0.5)
    assert predict(tool.with_width(layout, chosen)) <= 0.5 < predict(tool.with_width(layout, chosen + 1 / 256))
    if "scales" in layout:  # Ultralytics' scaled yaml: only the model's own scale, its depth and channel cap kept
        assert tool.with_width(layout, chosen)["scales"] == {"n": [0.33, chosen, 1024]}
    with pytest.raises(ValueError, match="no width multiple"):
        tool.width_multiple_for(layout, predict, target=0.1)


@pytest.mark.slow
def test_the_whole_front_runs_and_resumes(tmp_path):
    """--smoke on a random YOLOv5nu with a latency table whose timings are a known function of the plan: every arm
    at the target, each judged against the latency-aware prune, and a rerun that trains nothing again."""
    import json

    from test_prune import random_model, save_as_ultralytics_would
    from test_prune_latency import synthetic_table

    from yoloslim.data.synthetic import default_config
    from yoloslim.prune.latency import model_latency
    from yoloslim.utils.checks import load_detection_checkpoint

    tool = _tool()
    weights = save_as_ultralytics_would(random_model(nc=len(default_config().classes)), tmp_path / "best.pt")
    table = synthetic_table(weights, imgsz=64, out=tmp_path / "table.json")
    out = tmp_path / "front"
    argv = ["--smoke", "--weights", str(weights), "--out", str(out), "--threads", "1"]
    tool.main([*argv, "--latency-table", str(tmp_path / "table.json"), "--targets", "0.6"])
    points = json.loads((out / "front.json").read_text())["points"]
    assert set(points) == {"base", "control", "latency-0.6", "flops-0.6", "tp-0.6", "scratch-0.6"}
    for arm in ("latency", "flops", "tp", "scratch"):
        assert points[f"{arm}-0.6"]["predicted"] <= 0.6, (arm, points[f"{arm}-0.6"]["predicted"])
        against = "control" if arm == "latency" else "latency-0.6"
        assert points[f"{arm}-0.6"]["map_delta"]["against"] == against
    assert points["scratch-0.6"]["params"] < points["base"]["params"]
    assert model_latency(load_detection_checkpoint(out / "tp-0.6.pt")[0].float(), table)["predicted"] <= 0.6
    assert "| tp-0.6 |" in (out / "front.md").read_text()
    assert all(point["operators_ms"]["Conv"] > 0 for point in points.values())
    assert "Where the time goes at 1 thread(s)" in (out / "front.md").read_text()

    trained = sorted(out.glob("*/weights/best.pt"))
    assert len(trained) == 6  # sparse, control, three finetunes, scratch
    stamps = [p.stat().st_mtime_ns for p in trained]
    tool.main([*argv, "--latency-table", str(tmp_path / "table.json"), "--targets", "0.6"])
    assert [p.stat().st_mtime_ns for p in trained] == stamps


def test_an_arm_that_cannot_reach_the_target_is_reported_and_not_retried(tmp_path, monkeypatch):
    """Torch-Pruning's method keeps the head whole: a deep target can be out of its reach. The other arms go on, the
    verdict is kept for a rerun, and the table says which point is missing and why."""
    from test_prune import random_model, save_as_ultralytics_would
    from test_prune_latency import synthetic_table

    from yoloslim.utils.errors import YoloslimError

    tool = _tool()
    weights = save_as_ultralytics_would(random_model(nc=3), tmp_path / "best.pt")
    table = tmp_path / "table.json"
    synthetic_table(weights, imgsz=64, out=table)
    args = tool.argparse.Namespace(round_to=8)

    def unreachable(*_, goal, **__):
        raise YoloslimError(f"Torch-Pruning's method did not reach {goal} in 64 steps")

    monkeypatch.setattr(tool.bench_torch_pruning, "torch_pruning_steps", unreachable)
    prunes, missed = tool._prunes(tmp_path, weights, weights, table, 0.6, 64, args)
    assert set(prunes) == {"latency", "flops"} and "did not reach 0.6" in missed["tp"]
    monkeypatch.setattr(tool.bench_torch_pruning, "torch_pruning_steps", lambda *a, **k: pytest.fail("retried"))
    assert tool._prunes(tmp_path, weights, weights, table, 0.6, 64, args) == (prunes, missed)

    results = {
        "settings": {"threads": [1], "command": "python tools/bench_front.py", "finetune_epochs": 1, "extra_epochs": 2},
        "table": {"describe": "a table"},
        "points": {},
        "unreachable": {"tp-0.6": missed["tp"]},
    }
    assert f"- tp-0.6: not reached ({missed['tp']})" in tool.markdown(results)
