"""Pruning to a latency: the knapsack over groups, the mapping to a latency table, unreachable targets."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from yoloslim.config import PruneConfig
from yoloslim.prune.latency import _Options, choose_widths
from yoloslim.utils.errors import YoloslimError

# -- the knapsack, on synthetic groups and a synthetic bilinear latency -----------------------------------------------


def chain_latency(sizes: list, costs: list, fixed: float = 0.2):
    """Groups in a chain: convolution i reads group i - 1 and writes group i, so its work is the product of their
    fractions (the first reads the image)."""

    def predict(plan: dict) -> float:
        fractions = [plan[f"g{i}"] / s for i, s in enumerate(sizes)]
        ins = [1.0, *fractions[:-1]]
        return fixed + sum(c * a * b for c, a, b in zip(costs, ins, fractions))

    return predict


def options(sizes: list, scores: list, round_to: int = 4) -> _Options:
    groups = [SimpleNamespace(parts=[]) for _ in sizes]
    config = PruneConfig(round_to=round_to, min_keep=0.1)
    return _Options(groups, scores, [f"g{i}" for i in range(len(sizes))], config)


def test_the_knapsack_meets_a_predicted_target_and_beats_a_uniform_cut():
    sizes = [16, 32, 64, 64, 32]
    rng = torch.Generator().manual_seed(0)
    scores = [torch.rand(s, generator=rng) ** 2 for s in sizes]
    opts = options(sizes, scores)
    predict = chain_latency(sizes, costs=[0.1, 0.25, 0.2, 0.15, 0.1])
    for target in (0.8, 0.5, 0.35):
        choice = choose_widths(opts, predict, target)
        assert predict(opts.plan(choice)) <= target
        fitting = [k for k in range(len(opts.widths[0])) if predict(_uniform(opts, sizes, k)) <= target]
        assert fitting  # the targets are reachable by a uniform cut too
        assert opts.value(choice) >= _uniform_value(opts, sizes, max(fitting))


def _uniform(opts, sizes, k):
    """Every group at the same fraction of its width: the k-th of the first group's allowed widths (16 channels, so
    multiples of a quarter, which every group can keep)."""
    fraction = opts.widths[0][k] / sizes[0]
    return {root: int(fraction * s) for root, s in zip(opts.roots, sizes)}


def _uniform_value(opts, sizes, k):
    plan = _uniform(opts, sizes, k)
    return sum(values[widths.index(plan[root])] for root, widths, values in zip(opts.roots, opts.widths, opts.values))


def test_channels_go_where_latency_is_dear_and_importance_cheap():
    """Two groups of equal importance, one four times dearer per channel: the dear one gives up more."""
    sizes = [32, 32]
    scores = [torch.ones(32), torch.ones(32)]
    opts = options(sizes, scores)

    def predict(plan):
        return 0.2 + 0.64 * plan["g0"] / 32 + 0.16 * plan["g1"] / 32

    choice = choose_widths(opts, predict, 0.6)
    plan = opts.plan(choice)
    assert predict(plan) <= 0.6 and plan["g0"] < plan["g1"]


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"target_latency": 0.5}, "need latency_table"),
        ({"target_fps": 30.0}, "need latency_table"),
        ({"target_latency": 0.5, "target_flops": 0.5, "latency_table": "t.json"}, "give only one of"),
        ({"target_latency": 1.5, "latency_table": "t.json"}, r"in \(0, 1\]"),
    ],
)
def test_bad_latency_settings_are_refused(settings, message):
    with pytest.raises(YoloslimError, match=message):
        PruneConfig(**settings)


def test_rounding_defaults_to_eight_without_a_table():
    assert PruneConfig().round_to == 8 and PruneConfig(latency_table="t.json").round_to is None


# -- a tiny YOLOv5u, its export and a table of synthetic timings ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random YOLOv5n checkpoint, and a latency table of its ONNX whose timings are a known function of the plan."""
    from test_prune import random_model, save_as_ultralytics_would

    folder = tmp_path_factory.mktemp("tiny")
    model = random_model(cfg="yolov5n.yaml", nc=6)
    pt = save_as_ultralytics_would(model, folder / "best.pt")
    table = synthetic_table(pt, imgsz=64, out=folder / "table.json")
    return SimpleNamespace(model=model, pt=pt, table=table, path=folder / "table.json")


def synthetic_table(weights: Path, imgsz: int, out: Path):
    """A latency table of the checkpoint's ONNX whose timings are a known function of the plan: a fixed 0.15 of the
    unpruned latency plus a term per feature of the predictor, no timing at all."""
    import onnx

    from yoloslim.export.onnx import export_onnx
    from yoloslim.profile import ProfileConfig, profile
    from yoloslim.profile.groups import read_groups
    from yoloslim.profile.predictor import Features

    onnx_path = export_onnx(weights, imgsz=imgsz, out=out.with_suffix(".onnx"))
    features = Features.of_graph(read_groups(onnx.load(str(onnx_path))))
    truth = np.concatenate([[0.15], np.linspace(0.02, 0.1, len(features.names))])
    truth[1:] *= 0.85 / (features(features.sizes)[1:] @ truth[1:])

    def measure(widths, rounds):
        ratio = float(features(widths) @ truth)
        return 20 * ratio, 20.0, ratio

    return profile(onnx_path, ProfileConfig(threads=1), out=out, measure=measure, log=lambda s: None)


def _table_widths(result, table) -> dict:
    """The pruned model's width per table group, read from its conv widths (a split group's root holds all parts)."""
    return {g["root"]: result.widths[g["root"].removesuffix(".weight")][1] // g["sections"] for g in table.groups}


@pytest.mark.slow
def test_a_latency_target_is_met_as_predicted_with_the_tables_rounding(tiny):
    from yoloslim.prune import prune_model

    config = PruneConfig(method="l1", target_latency=0.6, latency_table=str(tiny.path), imgsz=64)
    result = prune_model(tiny.model, config)
    predicted = tiny.table.predictor(_table_widths(result, tiny.table))
    assert predicted == pytest.approx(result.latency["predicted"], abs=1e-4)
    assert 0.55 <= predicted <= 0.6  # the budget is used, not wasted
    assert result.config.round_to == tiny.table.round_to
    step = result.config.round_to
    assert all(w % step == 0 or w == size for size, w in result.widths.values())


@pytest.mark.slow
def test_a_frame_rate_target_reads_the_tables_milliseconds(tiny):
    from yoloslim.prune import prune_model

    fps = 1e3 / (0.7 * tiny.table.reference_ms)
    result = prune_model(tiny.model, PruneConfig(method="l1", target_fps=fps, latency_table=str(tiny.path), imgsz=64))
    assert result.latency["predicted_fps"] >= fps * 0.999
    assert result.latency["target"] == pytest.approx(0.7, abs=1e-3)


@pytest.mark.slow
def test_a_flops_target_reports_its_predicted_latency(tiny):
    from yoloslim.prune import prune_model

    result = prune_model(tiny.model, PruneConfig(target_flops=0.5, latency_table=str(tiny.path), round_to=8, imgsz=64))
    assert "target" not in result.latency
    assert result.latency["predicted"] == pytest.approx(
        tiny.table.predictor(_table_widths(result, tiny.table)), abs=1e-4
    )


@pytest.mark.slow
def test_an_unreachable_target_says_the_nearest_in_one_line(tiny, cli):
    code, err, _ = cli(
        "prune",
        "--weights",
        tiny.pt,
        "--method",
        "l1",
        "--target-latency",
        "0.05",
        "--latency-table",
        tiny.path,
        "--imgsz",
        "64",
        "--dry-run",
    )
    assert code == 2 and len(err.splitlines()) == 1
    assert "cannot be reached" in err and "predicted at" in err and "Traceback" not in err
    nearest = float(err.split("predicted at ")[1].split()[0])
    code, _, out = cli(
        "prune",
        "--weights",
        tiny.pt,
        "--method",
        "l1",
        "--target-latency",
        nearest,
        "--latency-table",
        tiny.path,
        "--imgsz",
        "64",
        "--dry-run",
    )
    assert code == 0 and "predicted:" in out


@pytest.mark.slow
def test_a_table_of_another_architecture_is_refused(tiny):
    from test_prune import random_model

    from yoloslim.prune import prune_model

    other = random_model(cfg="yolov8n.yaml")
    with pytest.raises(YoloslimError, match="no group matching"):
        prune_model(other, PruneConfig(target_latency=0.5, latency_table=str(tiny.path), imgsz=64))


@pytest.mark.slow
def test_a_narrower_model_of_the_tables_architecture_is_predicted_as_it_is(tiny):
    """What a prune predicted for its plan is what the table predicts for the pruned model itself; the same layout
    built narrower (a smaller width multiple) is predicted faster; a wider one is refused."""
    from test_prune import random_model

    from yoloslim.prune import prune_model
    from yoloslim.prune.latency import model_latency

    assert model_latency(tiny.model, tiny.table)["predicted"] == pytest.approx(tiny.table.predictor({}), abs=1e-4)
    result = prune_model(tiny.model, PruneConfig(target_flops=0.5, latency_table=str(tiny.path), round_to=8, imgsz=64))
    assert model_latency(result.model, tiny.table)["predicted"] == result.latency["predicted"]
    narrow = model_latency(random_model(cfg=_yolov5n_at_width(0.125), nc=6), tiny.table)
    assert narrow["predicted"] < result.latency["predicted"] < 1
    with pytest.raises(YoloslimError, match="no group matching"):
        model_latency(random_model(cfg=_yolov5n_at_width(0.5), nc=6), tiny.table)


def _yolov5n_at_width(width: float) -> dict:
    """Ultralytics' yolov5n.yaml with another width multiple (its n scale's depth and channel cap)."""
    from ultralytics.nn.tasks import yaml_model_load

    spec = yaml_model_load("yolov5n.yaml")
    depth, _, max_channels = spec["scales"]["n"]
    return {**spec, "scales": {"n": [depth, width, max_channels]}}


@pytest.mark.slow
@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"])
def test_every_family_prunes_to_a_latency_as_predicted(cfg, tmp_path):
    """A table profiled from the deployed export (for YOLO26 its one-to-one branch alone) matches the torch model,
    the target is met as predicted, and the pruned model is predicted as the plan was."""
    from test_prune import random_model, save_as_ultralytics_would

    from yoloslim.prune import prune_model
    from yoloslim.prune.latency import model_latency

    model = random_model(cfg=cfg)
    table = synthetic_table(save_as_ultralytics_would(model, tmp_path / "best.pt"), 64, tmp_path / "table.json")
    config = PruneConfig(method="l1", target_latency=0.6, latency_table=str(tmp_path / "table.json"), imgsz=64)
    result = prune_model(model, config)
    assert 0.55 <= result.latency["predicted"] <= 0.6
    assert model_latency(result.model, table)["predicted"] == pytest.approx(result.latency["predicted"], abs=1e-4)


def test_a_frame_rate_the_unpruned_model_already_reaches_is_refused(tiny):
    from yoloslim.prune import prune_model

    fps = 0.9e3 / tiny.table.reference_ms
    config = PruneConfig(method="l1", target_fps=fps, latency_table=str(tiny.path), imgsz=64)
    with pytest.raises(YoloslimError, match="already met"):
        prune_model(tiny.model, config)


def test_doubtful_latency_figures_are_flagged():
    from yoloslim.prune.latency import latency_warnings

    sound = {"target": 0.5, "predicted": 0.5, "measured": 0.51, "table_error": 0.04, "table_fastest": 0.3}
    assert latency_warnings(sound) == []
    assert "up to 59 %" in latency_warnings({**sound, "table_error": 0.588})[0]
    assert "extrapolates" in latency_warnings({**sound, "predicted": 0.2})[0]
    assert "misses the target" in latency_warnings({**sound, "measured": 0.626})[0]


def test_a_latency_target_of_the_whole_latency_prunes_nothing_it_need_not(tiny):
    from yoloslim.prune import prune_model

    config = PruneConfig(method="l1", target_latency=1.0, latency_table=str(tiny.path), imgsz=64)
    assert prune_model(tiny.model, config).latency["predicted"] <= 1.0
