import subprocess
import sys
import types

import pytest
import torch


def run_cli(*argv) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "yoloslim.cli", *argv], capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr.strip()


def save_model(path, model) -> str:
    torch.save({"model": model, "train_args": {}}, path)
    return str(path)


@pytest.fixture
def detection_pt(tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    return save_model(tmp_path / "det.pt", DetectionModel("yolov5n.yaml", nc=2, verbose=False))


def assert_one_line_error(code, err, *words):
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def test_missing_weights(tmp_path):
    assert_one_line_error(*run_cli("train", "--weights", str(tmp_path / "nope.pt")), "does not exist", "--weights")


@pytest.mark.parametrize("kind", ["classify", "segment"])
def test_non_detection_checkpoints_are_refused(tmp_path, kind):
    from ultralytics.nn.tasks import ClassificationModel, SegmentationModel

    model = (
        ClassificationModel("yolov8n-cls.yaml", nc=3, verbose=False)
        if kind == "classify"
        else SegmentationModel("yolov8n-seg.yaml", nc=3, verbose=False)
    )
    weights = save_model(tmp_path / f"{kind}.pt", model)
    assert_one_line_error(
        *run_cli("train", "--weights", weights),
        "is a classification model" if kind == "classify" else "is a segmentation model",
        "detection",
    )


def test_original_yolov5_repository_checkpoint_is_refused(tmp_path, monkeypatch):
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
    assert_one_line_error(*run_cli("train", "--weights", weights), "original YOLOv5 repository")


def test_missing_dataset_yaml(tmp_path, detection_pt):
    err = run_cli("train", "--weights", detection_pt, "--data", str(tmp_path / "nope.yaml"))
    assert_one_line_error(*err, "nope.yaml does not exist", "--data")


def test_negative_sr(detection_pt):
    assert_one_line_error(*run_cli("train", "--weights", detection_pt, "--sr=-1e-3"), "sr must be")


def test_unknown_passthrough_argument(detection_pt):
    assert_one_line_error(*run_cli("train", "--weights", detection_pt, "lr00=0.1"), "'lr00'")


def test_console_script_runs_as_module():
    result = subprocess.run(
        [sys.executable, "-m", "yoloslim.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "train" in result.stdout


def test_prune_dry_run_prints_the_plan_and_writes_nothing(detection_pt):
    from pathlib import Path

    folder = Path(detection_pt).parent
    before = set(folder.iterdir())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "yoloslim.cli",
            "prune",
            "--weights",
            detection_pt,
            "--ratio",
            "0.4",
            "--dry-run",
            "--imgsz",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "GFLOPs at 64 px" in result.stdout and "model.2.cv1.conv" in result.stdout
    assert set(folder.iterdir()) == before


def test_prune_conflicting_targets_are_refused(detection_pt):
    code, err = run_cli("prune", "--weights", detection_pt, "--ratio", "0.4", "--target-flops", "0.5")
    assert code == 2 and "give only one of ratio, threshold and target_flops" in err


def test_prune_unreachable_target_names_the_nearest(detection_pt):
    assert_one_line_error(
        *run_cli("prune", "--weights", detection_pt, "--target-flops", "0.01", "--min-keep", "0.5", "--imgsz", "64"),
        "smallest reachable",
    )


def test_missing_shipped_weights_is_a_one_line_error(monkeypatch, tmp_path):
    from yoloslim.utils import assets
    from yoloslim.utils.errors import YoloslimError

    monkeypatch.setattr(assets, "_CHECKOUT_ROOT", tmp_path)
    monkeypatch.setattr(assets, "_PACKAGE_OF_FOLDER", {"weights": "yoloslim_no_such_package"})
    with pytest.raises(YoloslimError, match="missing from this install"):
        assets.shipped_file("weights", "nothing.pt")


def test_eval_compares_every_model_with_the_first_on_the_same_images(tmp_path):
    from conftest import SHARED

    weights, data = SHARED / "weights" / "license_plate_yolov5nu.pt", SHARED / "data" / "license_plate" / "data.yaml"
    if not weights.exists():
        pytest.skip("../shared is not beside the project")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "yoloslim.cli",
            "eval",
            "--weights",
            str(weights),
            str(weights),
            "--data",
            str(data),
            "--imgsz",
            "64",
            "--bootstrap",
            "50",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    header, _, first, second = result.stdout.strip().splitlines()
    assert header.endswith("mAP50-95 change vs first, paired 95% CI |")
    assert first.endswith("| |") and second.endswith("| +0.0 pt (+0.0 to +0.0) |")


@pytest.mark.parametrize(
    "pair, option", [("data=other.yaml", "--data"), ("pretrained=base.pt", "--weights"), ("epochs=3", "--epochs")]
)
def test_arguments_with_their_own_option_are_refused_as_key_value(detection_pt, pair, option):
    assert_one_line_error(*run_cli("finetune", "--weights", detection_pt, pair), "set by yoloslim", option)


def test_resume_of_a_missing_or_unreadable_run_is_a_one_line_error(tmp_path):
    assert_one_line_error(*run_cli("finetune", "--weights", str(tmp_path / "last.pt"), "--resume"), "does not exist")
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 not a whole checkpoint")
    assert_one_line_error(
        *run_cli("train", "--weights", str(tmp_path / "torn.pt"), "--resume"), "not a readable checkpoint"
    )


def test_resume_refuses_a_new_teacher(detection_pt):
    assert_one_line_error(
        *run_cli("finetune", "--weights", detection_pt, "--resume", "--teacher", detection_pt), "drop teacher"
    )


def test_prune_output_in_an_unwritable_place_is_a_one_line_error(detection_pt, tmp_path):
    (tmp_path / "file").write_text("")
    err = run_cli(
        "prune", "--weights", detection_pt, "--ratio", "0.3", "--imgsz", "64", "--out", str(tmp_path / "file" / "p.pt")
    )
    assert_one_line_error(*err, "cannot write", "writable folder")
