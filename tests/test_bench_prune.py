"""The pruning benchmark judges every point against the right model: a finetune against a control of equal epochs."""

import importlib.util
from copy import deepcopy
from pathlib import Path

import pytest
import yaml

spec = importlib.util.spec_from_file_location(
    "bench_prune", Path(__file__).resolve().parents[1] / "tools" / "bench_prune.py"
)
bench_prune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_prune)

TAG = "0.82-r16"


def _row(map_, half_width=0.005, gflops_reduction=2.04):
    return {
        "map": map_,
        "map_ci95": [map_ - half_width, map_ + half_width],
        "gflops_reduction": gflops_reduction,
        "speedup": {"1": 1.9},
    }


def test_each_finetune_is_compared_with_the_control_trained_as_long():
    names = [
        "base",
        "sparse",
        "control",
        f"pruned-{TAG}",
        f"pruned-{TAG}-nocomp",
        f"finetuned-{TAG}",
        f"distilled-{TAG}-control",
        "control-plus30",
        f"finetuned-{TAG}-plus30",
        f"distilled-{TAG}-control-plus30",
    ]
    assert bench_prune._references(dict.fromkeys(names)) == {
        "sparse": "base",
        "control": "base",
        f"pruned-{TAG}": "sparse",
        f"pruned-{TAG}-nocomp": "sparse",
        f"finetuned-{TAG}": "control",
        f"distilled-{TAG}-control": "control",
        "control-plus30": "control",
        f"finetuned-{TAG}-plus30": "control-plus30",
        f"distilled-{TAG}-control-plus30": "control-plus30",
    }


@pytest.mark.parametrize(("finetuned", "met"), [(0.745, True), (0.735, False)])
def test_second_cycle_finetune_criterion_uses_the_second_cycle_control(finetuned, met):
    rows = {
        "base": _row(0.75, gflops_reduction=1),
        "sparse": _row(0.61, gflops_reduction=1),
        "control": _row(0.70, gflops_reduction=1),
        "control-plus30": _row(0.755, gflops_reduction=1),
        f"pruned-{TAG}": _row(0.609),
        f"finetuned-{TAG}": _row(0.70),
        f"finetuned-{TAG}-plus30": _row(finetuned),
    }
    checks = {check["point"]: check for check in bench_prune._criteria(rows) if "finetuning" in check["criterion"]}
    assert checks[f"finetuned-{TAG}"]["needed"] == pytest.approx(0.69)
    assert checks[f"finetuned-{TAG}-plus30"]["needed"] == pytest.approx(0.745)
    assert checks[f"finetuned-{TAG}-plus30"]["met"] is met


def test_a_wide_interval_does_not_excuse_a_finetune_more_than_a_point_under_its_control():
    rows = {
        "base": _row(0.30, gflops_reduction=1),
        "sparse": _row(0.10, gflops_reduction=1),
        "control": _row(0.309, half_width=0.05, gflops_reduction=1),
        f"pruned-{TAG}": _row(0.10),
        f"finetuned-{TAG}": _row(0.296, half_width=0.05),
    }
    check = next(check for check in bench_prune._criteria(rows) if "finetuning" in check["criterion"])
    assert check["needed"] == pytest.approx(0.299)
    assert check["met"] is False


def test_prune_names_carry_every_setting_that_changes_the_prune():
    config = bench_prune.PruneConfig
    assert bench_prune._prune_tag(config(ratio=0.82, round_to=16)) == TAG
    assert bench_prune._prune_tag(config(ratio=0.5)) == "0.5"
    assert bench_prune._prune_tag(config(target_flops=0.5, min_keep=0.5, round_to=16)) == "flops0.5-mk0.5-r16"
    assert bench_prune._prune_tag(config(target_latency=0.5, latency_table="t.json", round_to=16)) == "lat0.5-r16"


def test_distilled_points_of_any_teacher_and_weight_are_judged_but_not_those_of_another_prune():
    rows = {
        name: _row(0.70)
        for name in [
            "control",
            "control-plus30",
            f"distilled-{TAG}-control-dis0.5",
            f"distilled-{TAG}-dis0.5-plus30",
            f"distilled-{TAG}-dis1e-05",
            f"finetuned-{TAG}",
            "finetuned-0.8-r16",
        ]
    }
    assert [name for name, _ in bench_prune._tuned_points(rows, TAG)] == [
        f"distilled-{TAG}-control-dis0.5",
        f"distilled-{TAG}-dis0.5-plus30",
        f"distilled-{TAG}-dis1e-05",
        f"finetuned-{TAG}",
    ]
    assert [name for name, _ in bench_prune._tuned_points(rows, "0.8")] == []  # 0.8-r16 is another prune than 0.8


@pytest.mark.parametrize(("distill", "met"), [(None, False), ([], True), ([0.5], True), ([0.82], False)])
def test_distill_names_prunes_by_amount_or_takes_all(distill, met):
    assert bench_prune._distilled({"target_flops": 0.5}, distill) is met


def test_an_l1_prune_of_the_base_is_judged_against_the_base_and_has_no_post_prune_criterion():
    tag = "l1-flops0.5-r16"
    assert bench_prune._prune_tag(bench_prune.PruneConfig(method="l1", target_flops=0.5, round_to=16)) == tag
    rows = {
        "base": _row(0.75, gflops_reduction=1),
        "control": _row(0.76, gflops_reduction=1),
        f"pruned-{tag}": _row(0.05),
        f"finetuned-{tag}": _row(0.755),
    }
    assert bench_prune._references(rows)[f"pruned-{tag}"] == "base"
    criteria = {check["criterion"].split(" >=")[0]: check for check in bench_prune._criteria(rows)}
    assert "mAP50-95 right after pruning" not in criteria
    assert criteria["mAP50-95 after finetuning"]["met"]


def test_criteria_are_judged_on_unrounded_values():
    rows = {
        "base": _row(0.75, gflops_reduction=1),
        "sparse": _row(0.61, gflops_reduction=1),
        f"pruned-{TAG}": {**_row(0.609, gflops_reduction=2.0), "speedup": {"2": 2.0 * 0.8499}},
    }
    speed = next(check for check in bench_prune._criteria(rows) if check["criterion"].startswith("speedup"))
    assert speed["met"] is False


def test_the_report_says_when_no_prune_reaches_the_criteria():
    settings = dict(
        weights="weights/yolov5n-synthetic.pt",
        method="bn",
        sparse=None,
        sparse_epochs=30,
        sr=0.1,
        sr_schedule="constant",
        stop_at_flops=None,
        round_to=16,
        min_keep=0.1,
        skip_finetune=True,
        recipe={"imgsz": 320},
    )
    points = {
        "base": {
            **_row(0.75, gflops_reduction=1),
            "params": 10,
            "gflops": 1.0,
            "latency_ms_p50": {"1": 10.0},
            "speedup": {"1": 1.0},
        },
        "pruned-0.3-r16": {
            **_row(0.74, gflops_reduction=1.3),
            "params": 8,
            "gflops": 0.77,
            "latency_ms_p50": {"1": 8.0},
            "speedup": {"1": 1.25},
        },
    }
    results = {
        "points": points,
        "criteria": bench_prune._criteria(points),
        "settings": settings,
        "command": "python tools/bench_prune.py",
        "env": {"onnxruntime": "1.x", "cpu": "a CPU", "cpu_vector_isa": "avx2", "cores": 2},
    }
    assert "No prune here removes half of the GFLOPs" in bench_prune._markdown(results)


def test_stage_names_carry_the_settings_that_make_them_differ():
    args = bench_prune.argparse.Namespace(
        method="bn",
        sparse=None,
        sr=0.3,
        sparse_epochs=20,
        sr_schedule="constant",
        stop_at_flops=None,
        min_keep=0.1,
        round_to=8,
        targeted=False,
        sparse_recipe="sgd",
        stall_epochs=bench_prune.DEFAULT_SPARSITY.stall_epochs,
    )
    assert bench_prune._sparse_tag(args) == "sr0.3-e20"
    targeted = bench_prune.argparse.Namespace(**{**vars(args), "targeted": True, "sparse_recipe": "finetune"})
    assert bench_prune._sparse_tag(targeted) == "sr0.3-e20-targeted-ftrecipe"
    fixed = bench_prune.argparse.Namespace(**{**vars(targeted), "stall_epochs": 0})  # a stage whose sr never rises
    assert bench_prune._sparse_tag(fixed) == "sr0.3-e20-targeted-ftrecipe-stall0"
    assert (
        bench_prune._sparse_tag(bench_prune.argparse.Namespace(**{**vars(args), "stop_at_flops": 0.5}))
        == "sr0.3-e20-stop0.5"
    )
    # where a stopped stage ends depends on the prune it measured: its guards name it too
    stopped = bench_prune.argparse.Namespace(**{**vars(args), "stop_at_flops": 0.5, "min_keep": 0.25, "round_to": 16})
    assert bench_prune._sparse_tag(stopped) == "sr0.3-e20-stop0.5-mk0.25-r16"
    assert bench_prune._recipe_tag({"warmup_bias_lr": 0.0, "lr0": 0.001}) == "-warmup_bias_lr0.0-lr00.001"
    # a --recipe change reaches the sparsity stage unless its own recipe sets that key, and then names it
    assert bench_prune._sparse_changes({"seed": 1, "lr0": 0.001}, "finetune") == {"seed": 1, "lr0": 0.001}
    assert bench_prune._sparse_changes({"seed": 1, "lr0": 0.001}, "sgd") == {"seed": 1}
    assert (
        bench_prune._sparse_tag(bench_prune.argparse.Namespace(**{**vars(args), "sr_schedule": "linear"}))
        == "sr0.3-e20-linear"
    )
    assert bench_prune._sparse_tag(bench_prune.argparse.Namespace(**{**vars(args), "sparse": Path("given.pt")})) == ""
    assert bench_prune._sparse_tag(bench_prune.argparse.Namespace(**{**vars(args), "method": "l1"})) == ""


def test_checkpoints_are_named_by_the_stage_that_made_them_not_by_their_point():
    run = Path("runs/bench/prune/synthetic")
    assert bench_prune._stage(run / "control-e100" / "weights" / "best.pt") == "control-e100"
    assert bench_prune._stage(run / f"pruned-{TAG}.pt") == f"pruned-{TAG}"
    assert bench_prune._stage(Path("weights/yolov5n-synthetic-sparse.pt")) == "yolov5n-synthetic-sparse"


def test_a_stage_that_stopped_early_counts_the_epochs_it_trained(tmp_path):
    best = tmp_path / "sparse-sr0.3-e30-stop0.5" / "weights" / "best.pt"
    best.parent.mkdir(parents=True)
    (best.parents[1] / "results.csv").write_text("epoch,time\n1,10\n2,20\n3,30\n")
    assert bench_prune._epochs_trained(best, default=30) == 3
    assert (
        bench_prune._epochs_trained(tmp_path / "elsewhere" / "sparse.pt", default=30) == 30
    )  # a --sparse checkpoint from elsewhere


def test_the_image_size_defaults_to_the_one_the_model_was_trained_at():
    root = Path(__file__).resolve().parents[1] / "weights"
    recipe = yaml.safe_load((root / "yolov5n-synthetic.recipe.yaml").read_text())["recipe"]
    assert bench_prune._trained_imgsz(root / "yolov5n-synthetic.pt") == recipe["train"]["imgsz"]


@pytest.mark.parametrize(("text", "fraction"), [("0.5", 0.5), ("none", None), ("None", None)])
def test_the_stop_can_be_turned_off(text, fraction):
    assert bench_prune._fraction_or_none(text) == fraction


@pytest.mark.parametrize(
    ("distill", "teachers", "says"),
    [
        (None, ["base"], "not distilled"),
        ([], ["base"], "distilled-*: teacher = base"),
        ([0.5], ["base", "control"], "distilled-*-control: teacher = control"),
    ],
)
def test_the_budget_line_names_a_teacher_only_when_a_point_was_distilled(distill, teachers, says):
    settings = {
        "method": "bn",
        "sparse": None,
        "sr": 0.1,
        "sr_schedule": "constant",
        "sparse_epochs": 30,
        "stop_at_flops": None,
        "round_to": 16,
        "skip_finetune": False,
        "distill": distill,
        "distill_teacher": teachers,
        "finetune_epochs_used": 20,
        "recipe": {"optimizer": "auto", "batch": 16},
    }
    line = bench_prune._budgets(settings)
    assert says in line
    assert ("teacher" in line) == (distill is not None)


def _classic_checkpoint(classes: int, out: Path) -> Path:
    """A new anchor-based YOLOv5n (yoloslim's layout at width 1/8, so round_to 8 leaves channels to cut), written in
    the original repository's format with the keys of the fixture its train.py wrote (trained at 64 px)."""
    import torch
    from test_classic_train import CHECKPOINT

    from yoloslim.models import DetectionModel, load_classic_checkpoint, yolov5_layout
    from yoloslim.models.save import original_names, save_original_format

    torch.manual_seed(0)
    model = DetectionModel(dict(yolov5_layout("n", nc=classes), width_multiple=0.125))
    save_original_format(model, load_classic_checkpoint(CHECKPOINT)[1], out, original_names(CHECKPOINT), {})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml", "classic"])
def test_the_whole_benchmark_runs_on_each_family_and_resumes(cfg, tmp_path, monkeypatch):
    """--smoke on a YOLOv8n, a YOLO11n, a YOLO26n and the original repository's anchor-based YOLOv5n: the stages, the
    control and the criteria as for YOLOv5u, and a rerun that trains nothing again."""
    import json
    import sys

    from test_prune import random_model, save_as_ultralytics_would

    from yoloslim.data.synthetic import default_config

    classes = len(default_config().classes)  # the smoke run's dataset
    if cfg == "classic":
        weights = _classic_checkpoint(classes, tmp_path / "best.pt")
    else:
        weights = save_as_ultralytics_would(random_model(nc=classes, cfg=cfg), tmp_path / "best.pt")
    out = tmp_path / "bench"
    argv = ["bench_prune.py", "--smoke", "--weights", str(weights), "--out", str(out), "--threads", "1"]
    stage = f"sr{float(bench_prune.TARGETED_SR)}-e1-targeted-ftrecipe-stop0.5"  # the default stage, one epoch
    tags = [f"{stage}-flops0.5"]
    if cfg == "yolov8n.yaml":  # and a prune to a latency, with a table whose timings are a known function of the plan
        from test_prune_latency import synthetic_table

        table = synthetic_table(weights, imgsz=64, out=tmp_path / "table.json")
        argv += ["--target-flops", "0.5", "--target-latency", "0.6", "--latency-table", str(tmp_path / "table.json")]
        tags.append(f"{stage}-lat0.6")
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(bench_prune, "LATENCY_ROUNDS", 4)
    bench_prune.main()
    points = json.loads((out / "results.json").read_text())["points"]
    assert set(points) == {"base", "control", "sparse"} | {
        f"{kind}-{tag}" for tag in tags for kind in ("pruned", "finetuned")
    } | {f"pruned-{tag}-nocomp" for tag in tags}
    for tag in tags:
        assert points[f"finetuned-{tag}"]["params"] == points[f"pruned-{tag}"]["params"] < points["control"]["params"]
        assert points[f"finetuned-{tag}"]["map_delta"]["against"] == "control"
    assert points[f"pruned-{tags[0]}"]["gflops_reduction"] >= 2
    # a speed criterion per prune that removes half the GFLOPs; the latency prune, held back by the table's fixed
    # part, removes more
    assert (out / "results.md").read_text().count("| speedup >= 0.85 x GFLOPs reduction") == len(tags)
    if cfg == "yolov8n.yaml":
        import torch

        from yoloslim.utils.metadata import checkpoint_metadata

        ckpt = torch.load(out / f"pruned-{tags[1]}.pt", map_location="cpu", weights_only=False)
        latency = checkpoint_metadata(ckpt)["prune"]["latency"]
        assert latency["predicted"] <= 0.6 and latency["table"] == table.describe(), latency

    trained = sorted(out.glob("*/weights/best.pt"))
    assert len(trained) == 1 + len(tags) + 1  # sparse, the finetunes, control
    stamps = [p.stat().st_mtime_ns for p in trained]
    bench_prune.main()
    assert [p.stat().st_mtime_ns for p in trained] == stamps


def _torch_pruning_tool():
    """tools/bench_torch_pruning.py as a module, registered so that its C2f_v2 pickles and loads."""
    import sys

    if "bench_torch_pruning" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "tools" / "bench_torch_pruning.py"
        tool_spec = importlib.util.spec_from_file_location("bench_torch_pruning", path)
        sys.modules["bench_torch_pruning"] = importlib.util.module_from_spec(tool_spec)
        tool_spec.loader.exec_module(sys.modules["bench_torch_pruning"])
    return sys.modules["bench_torch_pruning"]


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml"])
def test_torch_pruning_split_blocks_compute_what_the_originals_compute(cfg):
    import torch
    from test_prune import random_model

    tool = _torch_pruning_tool()
    model = random_model(cfg=cfg)
    split = deepcopy(model)
    tool.split_c2f(split)
    assert not any(isinstance(m, tool.C2f) for m in split.modules())
    blocks = sum(isinstance(m, tool.C2f) for m in model.modules())
    assert blocks and sum(isinstance(m, tool.C2f_v2) for m in split.modules()) == blocks
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(split(x)[0], model(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_pruning_method_reaches_the_target_and_leaves_the_head_whole():
    import torch
    from test_prune import random_model

    from yoloslim.graph import model_stats

    tool = _torch_pruning_tool()
    model = random_model(cfg="yolo11n.yaml")
    pruned, steps = tool.torch_pruning_prune(model, imgsz=64, target_flops=0.5, round_to=8)
    assert steps > 1 and model_stats(pruned, 64)["gflops"] <= 0.5 * model_stats(model, 64)["gflops"]
    head_widths = [m.out_channels for m in model.model[-1].modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in pruned.model[-1].modules() if isinstance(m, torch.nn.Conv2d)] == head_widths
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels > 8]
    assert widths and all(w % 8 == 0 for w in widths)
    with torch.no_grad():
        assert pruned(torch.rand(1, 3, 64, 64))[0].shape == model(torch.rand(1, 3, 64, 64))[0].shape
