import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch


def save_model(path, model) -> str:
    torch.save({"model": model, "train_args": {}}, path)
    return str(path)


@pytest.fixture(scope="module")
def detection_pt(tmp_path_factory):
    from ultralytics.nn.tasks import DetectionModel

    return save_model(tmp_path_factory.mktemp("det") / "det.pt", DetectionModel("yolov5n.yaml", nc=2, verbose=False))


def assert_one_line_error(result, *words):
    code, err, _ = result
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def test_missing_weights(cli, tmp_path):
    assert_one_line_error(cli("train", "--weights", tmp_path / "nope.pt"), "does not exist", "--weights")


@pytest.mark.parametrize("kind", ["classify", "segment"])
def test_non_detection_checkpoints_are_refused(cli, tmp_path, kind):
    from ultralytics.nn.tasks import ClassificationModel, SegmentationModel

    model = (
        ClassificationModel("yolov8n-cls.yaml", nc=3, verbose=False)
        if kind == "classify"
        else SegmentationModel("yolov8n-seg.yaml", nc=3, verbose=False)
    )
    weights = save_model(tmp_path / f"{kind}.pt", model)
    assert_one_line_error(
        cli("train", "--weights", weights),
        "is a classification model" if kind == "classify" else "is a segmentation model",
        "detection",
    )


def test_original_yolov5_repository_checkpoint_is_refused(cli, tmp_path, monkeypatch):
    # Checkpoints of github.com/ultralytics/yolov5 pickle classes from its top-level `models` package.
    package, module = types.ModuleType("models"), types.ModuleType("models.yolo")
    model_class = type("Model", (torch.nn.Module,), {"__module__": "models.yolo"})
    module.Model = model_class
    package.yolo = module
    monkeypatch.setitem(sys.modules, "models", package)
    monkeypatch.setitem(sys.modules, "models.yolo", module)
    weights = save_model(tmp_path / "yolov5s.pt", model_class())
    monkeypatch.delitem(sys.modules, "models")
    monkeypatch.delitem(sys.modules, "models.yolo")
    assert_one_line_error(cli("train", "--weights", weights), "original YOLOv5 repository")


def test_missing_dataset_yaml(cli, tmp_path, detection_pt):
    result = cli("train", "--weights", detection_pt, "--data", tmp_path / "nope.yaml")
    assert_one_line_error(result, "nope.yaml does not exist", "--data")


def test_negative_sr(cli, detection_pt):
    assert_one_line_error(cli("train", "--weights", detection_pt, "--sr=-1e-3"), "sr must be")


def test_unknown_passthrough_argument(cli, detection_pt):
    assert_one_line_error(cli("train", "--weights", detection_pt, "lr00=0.1"), "'lr00'")


def test_console_script_runs_as_module():
    result = subprocess.run(
        [sys.executable, "-m", "yoloslim.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "train" in result.stdout


@pytest.mark.slow
def test_an_error_in_a_separate_process_is_one_line_on_stderr(tmp_path):
    """What a user's shell sees, warnings and logging included; the tests above run the CLI in this process."""
    result = subprocess.run(
        [sys.executable, "-m", "yoloslim.cli", "train", "--weights", str(tmp_path / "nope.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line_error((result.returncode, result.stderr.strip(), result.stdout), "does not exist", "--weights")


def test_prune_dry_run_prints_the_plan_and_writes_nothing(cli, detection_pt):
    folder = Path(detection_pt).parent
    before = set(folder.iterdir())
    code, err, out = cli("prune", "--weights", detection_pt, "--ratio", "0.4", "--dry-run", "--imgsz", "64")
    assert code == 0, err
    assert "GFLOPs at 64 px" in out and "model.2.cv1.conv" in out
    assert set(folder.iterdir()) == before


def test_prune_conflicting_targets_are_refused(cli, detection_pt):
    code, err, _ = cli("prune", "--weights", detection_pt, "--ratio", "0.4", "--target-flops", "0.5")
    assert code == 2 and "give only one of ratio, threshold and target_flops" in err


def test_prune_unreachable_target_names_the_nearest(cli, detection_pt):
    assert_one_line_error(
        cli("prune", "--weights", detection_pt, "--target-flops", "0.01", "--min-keep", "0.5", "--imgsz", "64"),
        "smallest reachable",
    )


def test_missing_shipped_weights_is_a_one_line_error(monkeypatch, tmp_path):
    from yoloslim.utils import assets
    from yoloslim.utils.errors import YoloslimError

    monkeypatch.setattr(assets, "_CHECKOUT_ROOT", tmp_path)
    monkeypatch.setattr(assets, "_PACKAGE_OF_FOLDER", {"weights": "yoloslim_no_such_package"})
    with pytest.raises(YoloslimError, match="missing from this install"):
        assets.shipped_file("weights", "nothing.pt")


@pytest.mark.slow
def test_eval_compares_every_model_with_the_first_on_the_same_images(
    cli, shipped_weights, shipped_sparse_weights, synthetic_val_data
):
    weights = (shipped_weights, shipped_sparse_weights, shipped_weights)
    code, err, out = cli(
        "eval",
        "--weights",
        *weights,
        "--data",
        synthetic_val_data,
        "--imgsz",
        "320",
        "--bootstrap",
        "50",
        "--threads",
        "1",
    )
    assert code == 0, err
    header, _, *rows = out.strip().splitlines()
    assert header.endswith("mAP50-95 change vs first, paired 95% CI |")
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[0] for c in cells] == [str(w) for w in weights] and cells[0][-1] == ""
    map_ = [float(c[2].split()[0]) for c in cells]
    change = [re.fullmatch(r"([+-][0-9.]+) pt \(([+-][0-9.]+) to ([+-][0-9.]+)\)", c[-1]).groups() for c in cells[1:]]
    sparse_change, low, high = (float(v) for v in change[0])
    assert sparse_change == pytest.approx(100 * (map_[1] - map_[0]), abs=0.15) and low < high < 0  # each is a loss
    assert change[1] == ("+0.0", "+0.0", "+0.0")  # the first model against itself, image for image


@pytest.mark.parametrize(
    "pair, option", [("data=other.yaml", "--data"), ("pretrained=base.pt", "--weights"), ("epochs=3", "--epochs")]
)
def test_arguments_with_their_own_option_are_refused_as_key_value(cli, detection_pt, pair, option):
    assert_one_line_error(cli("finetune", "--weights", detection_pt, pair), "set by yoloslim", option)


def test_a_caller_without_the_option_may_take_its_key_value():
    """tools/bench_prune.py has no --batch: its --recipe takes batch=8, the CLI's key=value does not."""
    from yoloslim.cli import parse_overrides
    from yoloslim.utils.errors import YoloslimError

    assert parse_overrides(["batch=8", "lr0=0.005"], allow=("batch",)) == {"batch": 8, "lr0": 0.005}
    with pytest.raises(YoloslimError, match="--batch"):
        parse_overrides(["batch=8"])
    with pytest.raises(YoloslimError, match="--data"):
        parse_overrides(["data=other.yaml"], allow=("batch",))


def test_resume_of_a_missing_or_unreadable_run_is_a_one_line_error(cli, tmp_path):
    assert_one_line_error(cli("finetune", "--weights", tmp_path / "last.pt", "--resume"), "does not exist")
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 not a whole checkpoint")
    assert_one_line_error(cli("train", "--weights", tmp_path / "torn.pt", "--resume"), "not a readable checkpoint")


def test_resume_refuses_a_new_teacher(cli, detection_pt):
    assert_one_line_error(
        cli("finetune", "--weights", detection_pt, "--resume", "--teacher", detection_pt), "drop teacher"
    )


def test_prune_output_in_an_unwritable_place_is_a_one_line_error(cli, detection_pt, tmp_path):
    (tmp_path / "file").write_text("")
    result = cli(
        "prune", "--weights", detection_pt, "--ratio", "0.3", "--imgsz", "64", "--out", tmp_path / "file" / "p.pt"
    )
    assert_one_line_error(result, "cannot write", "writable folder")


def test_eval_refuses_a_negative_bootstrap(cli, detection_pt):
    code, err, _ = cli("eval", "--weights", detection_pt, "--bootstrap", -1)
    assert code == 2 and "--bootstrap -1" in err and len(err.splitlines()) == 1, err
