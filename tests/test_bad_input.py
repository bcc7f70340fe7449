"""Bad input to each command: one line on stderr, `yoloslim CMD: error: ...` naming the file and the problem, exit code
2, and nothing written. Each command runs in an empty working directory on tiny hand-written datasets."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_data import write_dataset

from yoloslim.utils.errors import YoloslimError

NAMES = ["a", "b"]
SPEC = {"train": "images/train", "val": "images/val", "names": NAMES}
GOOD_LABEL = "0 0.5 0.5 0.2 0.2\n"


def dataset_with_train_labels(root, *labels):
    """The second training image's label is the given text; the first one's is good."""
    return write_dataset(root, {"train": {"t0": GOOD_LABEL, "t1": labels[0]}, "val": {"v0": GOOD_LABEL}})


def missing_file(root):
    return root / "nope.yaml", ["nope.yaml", "does not exist"]


def not_a_yaml(root):
    (root / "data.json").write_text("{}")
    return root / "data.json", ["data.json", "is not a dataset yaml"]


def invalid_yaml(root):
    return write_dataset(root, yaml_text="train: [images/train\nval: images/val\n"), ["data.yaml", "not valid YAML"]


def not_a_mapping(root):
    data = write_dataset(root, yaml_text="- images/train\n- images/val\n")
    return data, ["data.yaml", "holds a list, not keys and values"]


def without(key):
    def dataset(root):
        spec = {k: v for k, v in SPEC.items() if k != key}
        return write_dataset(root, yaml_text=yaml.safe_dump(spec)), ["data.yaml", f"does not give {key}:"]

    dataset.__name__ = f"no_{key}"
    return dataset


def missing_split_folder(root):
    spec = {**SPEC, "val": "images/validation"}
    return write_dataset(root, yaml_text=yaml.safe_dump(spec)), ["data.yaml", "validation, which does not exist"]


def missing_image_list(root):
    spec = {**SPEC, "train": "train.txt"}
    return write_dataset(root, yaml_text=yaml.safe_dump(spec)), ["data.yaml", "train.txt, which does not exist"]


def image_list_of_missing_images(root):
    data = write_dataset(root, yaml_text=yaml.safe_dump({**SPEC, "train": "train.txt"}))
    (root / "train.txt").write_text("./images/train/t0.jpg\n./images/train/gone.jpg\n")
    return data, ["train.txt", "lists 1 missing images", "gone.jpg"]


def split_without_images(root):
    data = write_dataset(root, {"train": {}, "val": {"v0": GOOD_LABEL}})
    return data, ["split 'train' of", "data.yaml", "has no images"]


def images_without_labels(root):
    data = write_dataset(root, {"train": {"t0": None, "t1": None}, "val": {"v0": GOOD_LABEL}})
    return data, ["data.yaml", "none of the 2 images of split 'train'", "has a label file"]


def only_empty_labels(root):
    data = write_dataset(root, {"train": {"t0": GOOD_LABEL}, "val": {"v0": "", "v1": "\n"}})
    return data, ["data.yaml", "every label file of split 'val'", "is empty"]


def class_outside_names(root):
    return dataset_with_train_labels(root, "2 0.5 0.5 0.2 0.2\n"), ["t1.txt", "class 2 is not one of", "0-1"]


def malformed_row(root):
    return dataset_with_train_labels(root, "0 0.5 0.5 0.2\n"), ["t1.txt", "'0 0.5 0.5 0.2' is neither"]


def pixel_coordinates(root):
    return dataset_with_train_labels(root, "0 40 30 8 8\n"), ["t1.txt", "not in fractions of the image size"]


def negative_width(root):  # Ultralytics allows the centre 1% past the edge, never a negative size
    return dataset_with_train_labels(root, "0 0.5 0.5 -0.005 0.2\n"), ["t1.txt", "width and height not below 0"]


def boxes_and_polygons_mixed(root):
    label = "0 0.5 0.5 0.2 0.2\n1 0.1 0.2 0.3 0.2 0.3 0.6 0.1 0.6\n"
    return dataset_with_train_labels(root, label), ["t1.txt, line 2", "mixes box rows", "polygon rows"]


BAD_DATA = [
    missing_file,
    not_a_yaml,
    invalid_yaml,
    not_a_mapping,
    without("train"),
    without("val"),
    without("names"),
    missing_split_folder,
    missing_image_list,
    image_list_of_missing_images,
    split_without_images,
    images_without_labels,
    only_empty_labels,
    class_outside_names,
    malformed_row,
    pixel_coordinates,
    negative_width,
    boxes_and_polygons_mixed,
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A copy of the shipped baseline, so that commands writing beside their input would write here, not in weights/;
    and a tiny image for the commands that read one."""
    import cv2
    import numpy as np

    from yoloslim.utils.assets import BASELINE, shipped_file

    folder = tmp_path_factory.mktemp("models")
    shutil.copy(shipped_file("weights", BASELINE), folder / "best.pt")
    cv2.imwrite(str(folder / "image.jpg"), np.full((32, 32, 3), 127, np.uint8))
    return folder


def data_commands(weights):
    """Each command that takes --data, as argv without it."""
    return {
        "train": ["train", "--weights", weights, "--epochs", "1", "--imgsz", "64"],
        "finetune": ["finetune", "--weights", weights, "--epochs", "1", "--imgsz", "64"],
        "eval": ["eval", "--weights", weights, "--imgsz", "64"],
        "export": ["export", "--weights", weights, "--precision", "int8", "--imgsz", "64"],
        "bench": ["bench", "--weights", weights, "--imgsz", "64"],
        "slim": ["slim", "--weights", weights, "--imgsz", "64"],
    }


COMMANDS = ["train", "finetune", "eval", "export", "bench", "slim"]


def files_under(*folders) -> dict:
    """Every file and folder below the folders, files with their modification time."""
    return {p: p.stat().st_mtime_ns if p.is_file() else None for f in folders for p in Path(f).rglob("*")}


def assert_refused(command, code, err, words):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"yoloslim {command}: error: "), err
    for word in words:
        assert word in err, err


@pytest.fixture
def refused_without_writing(capfd, monkeypatch):
    """Run yoloslim.cli.main(argv) in the first of the watched folders and check that it refuses with the words, and
    that nothing below the watched folders changed."""
    import logging

    from ultralytics.utils import LOGGER

    from yoloslim.cli import main

    def check(command, argv, words, watched):
        before = files_under(*watched)
        monkeypatch.chdir(watched[0])
        # Ultralytics' log handler keeps the stdout it was made with, which an earlier test's capture may have closed
        # (pytest's own handlers, of subclasses, are left alone).
        for handler in LOGGER.handlers:
            if type(handler) is logging.StreamHandler:
                monkeypatch.setattr(handler, "stream", sys.stdout)
        capfd.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse refusing the arguments
            code = e.code
        assert_refused(command, code, capfd.readouterr().err, words)
        assert files_under(*watched) == before, "a refused command must write nothing"

    return check


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("bad", BAD_DATA, ids=lambda f: f.__name__)
def test_bad_data_is_one_line_exit_2_and_nothing_written(command, bad, tmp_path, models, refused_without_writing):
    (tmp_path / "set").mkdir()
    data, words = bad(tmp_path / "set")
    argv = [*data_commands(models / "best.pt")[command], "--data", data]
    refused_without_writing(command, argv, words, (tmp_path, models))


@pytest.fixture(scope="module")
def other_task_weights(tmp_path_factory):
    """Tiny checkpoints of the other tasks, built from Ultralytics' yaml and saved by Ultralytics' own Model.save."""
    from ultralytics import YOLO

    folder = tmp_path_factory.mktemp("tasks")
    for task in TASKS:
        YOLO(f"yolov8n-{task}.yaml").save(folder / f"{task}.pt")
    return folder


TASKS = {
    "cls": "a classification model (task classify)",
    "seg": "a segmentation model (task segment)",
    "pose": "a pose estimation model (task pose)",
    "obb": "an oriented bounding box (OBB) model (task obb)",
}


def weights_commands(weights, models, data):
    """Each command that takes --weights, with everything else it needs, so that only the weights are wrong."""
    image = models / "image.jpg"
    return {
        "train": ["train", "--weights", weights, "--data", data],
        "prune": ["prune", "--weights", weights],
        "finetune": ["finetune", "--weights", weights, "--data", data],
        "eval": ["eval", "--weights", weights, "--data", data],
        "export": ["export", "--weights", weights],
        "detect": ["detect", "--weights", weights, "--source", image],
        "bench": ["bench", "--weights", weights, "--source", image],
        "slim": ["slim", "--weights", weights, "--data", data],
    }


def refuse_task(task, command, folder, tmp_path, models, refused_without_writing):
    argv = weights_commands(folder / f"{task}.pt", models, write_dataset(tmp_path / "set"))[command]
    refused_without_writing(command, argv, [f"{task}.pt is {TASKS[task]}"], (tmp_path, models, folder))


@pytest.mark.parametrize("task", TASKS)
def test_weights_of_each_other_task_are_named(task, other_task_weights, tmp_path, models, refused_without_writing):
    refuse_task(task, "train", other_task_weights, tmp_path, models, refused_without_writing)


@pytest.mark.parametrize(
    "command",
    ["prune", "finetune", "eval", "export", "detect", "bench", "slim"],
)
def test_every_command_refuses_weights_of_another_task(
    command, other_task_weights, tmp_path, models, refused_without_writing
):
    refuse_task("cls", command, other_task_weights, tmp_path, models, refused_without_writing)


def test_a_refusal_is_one_line_from_the_installed_command_too(tmp_path, models):
    """The same in a process of its own: nothing else on stderr (warnings, logging) around the one line."""
    data, words = missing_split_folder(tmp_path / "set")
    result = subprocess.run(
        [sys.executable, "-m", "yoloslim.cli", "eval", "--weights", str(models / "best.pt"), "--data", str(data)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert_refused("eval", result.returncode, result.stderr, words)


def test_train_and_val_of_the_same_images_are_refused_by_int8_export_only(tmp_path, models, refused_without_writing):
    from yoloslim.data import resolve_data

    data = write_dataset(tmp_path / "set", yaml_text=yaml.safe_dump({**SPEC, "val": SPEC["train"]}))
    assert resolve_data(data) == data  # training and evaluating on them is the user's choice
    argv = [*data_commands(models / "best.pt")["export"], "--data", data]
    words = ["data.yaml", "also in its val split", "leak"]
    refused_without_writing("export", argv, words, (tmp_path, models))


def test_an_empty_calibration_set_says_it_is_empty(tmp_path):
    from yoloslim.export.qdq import calibration_images

    data = write_dataset(tmp_path, {"train": {}, "val": {"v0": GOOD_LABEL}})
    with pytest.raises(YoloslimError, match="train split of .*data.yaml has no images, so the calibration set"):
        calibration_images(data)
    with pytest.raises(YoloslimError, match="at least 1 image"):
        calibration_images(write_dataset(tmp_path / "full"), count=0)


def test_calibration_leaves_out_the_val_images(tmp_path):
    from yoloslim.export.qdq import calibration_images

    data = write_dataset(tmp_path, yaml_text=yaml.safe_dump({**SPEC, "val": "val.txt"}))
    (tmp_path / "val.txt").write_text("./images/val/v0.jpg\n./images/train/t1.jpg\n")
    assert [p.name for p in calibration_images(data)] == ["t0.jpg"]


# -- the training stages' own options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["train", "--epochs", "0"], ["--epochs 0", "1 or more"]),
        (["train", "lr0=abc"], ["lr0", "key=value"]),
        (["finetune", "optimizer=Foo"], ["optimizer=Foo", "AdamW"]),
        (["train", "--resume", "--sr", "5"], ["--sr", "drop"]),
        (["train", "--no-include-head"], ["--no-include-head", "--no-targeted"]),
        (["finetune", "--target", "cpu"], ["--target", "--qat"]),
        (["finetune", "--qat", "--revive", "0.01"], ["--revive", "qat"]),
        (["finetune", "--resume", "--revive", "0.01"], ["--revive", "resumed"]),
    ],
    ids=lambda a: " ".join(a) if isinstance(a, list) and a and a[0] in ("train", "finetune") else "",
)
def test_training_options_that_cannot_apply_are_refused(argv, words, tmp_path, models, refused_without_writing):
    command, *rest = argv
    refused_without_writing(command, [command, "--weights", models / "best.pt", *rest], words, [tmp_path, models])


@pytest.mark.parametrize(
    "argv",
    [["prune", "--weights", ""], ["train", "--data", ""], ["prune", "--out", ""], ["eval", "--weights", "", "x.pt"]],
    ids=lambda a: " ".join(a[:2]),
)
def test_an_empty_path_is_refused_not_read_as_left_out(argv, tmp_path, models, refused_without_writing):
    refused_without_writing(
        argv[0], argv, [f"{next(a for a in argv if a.startswith('--'))} is empty"], [tmp_path, models]
    )


def test_key_value_arguments_read_as_ultralytics_reads_them():
    from yoloslim.cli import parse_overrides

    assert parse_overrides(["lr0=1e-3", "cos_lr=True", "optimizer=AdamW"]) == {
        "lr0": 0.001,
        "cos_lr": True,
        "optimizer": "AdamW",
    }


def test_the_optimizers_are_those_ultralytics_builds():
    import ast
    import inspect
    import re

    from ultralytics.engine.trainer import BaseTrainer

    from yoloslim.utils.training import ULTRALYTICS_OPTIMIZERS

    listed = re.search(r"optimizers = (\{[^}]*\})", inspect.getsource(BaseTrainer.build_optimizer))
    assert listed, "Ultralytics' build_optimizer no longer lists its optimizers in one set"
    assert set(ULTRALYTICS_OPTIMIZERS) == ast.literal_eval(listed.group(1))


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("model.onnx", ["neither a checkpoint"]),
        ("missing.yaml", ["not found"]),
        ("dataset.yaml", ["not a model yaml", "--data"]),
        ("yolov8n-seg.yaml", ["segment"]),
    ],
)
def test_train_refuses_what_is_no_detection_model(spec, words, tmp_path, models, refused_without_writing):
    (tmp_path / "dataset.yaml").write_text("train: images\nval: images\nnames: [a]\n")
    (tmp_path / "model.onnx").write_bytes(b"")
    refused_without_writing("train", ["train", "--weights", spec, "--epochs", "1"], words, [tmp_path, models])


@pytest.mark.parametrize("command", ["train", "prune", "slim"])
def test_a_fused_model_has_no_gammas_to_prune_or_penalise(command, tmp_path, models, refused_without_writing):
    from ultralytics import YOLO

    fused = YOLO(models / "best.pt")
    fused.model.fuse()
    fused.save(tmp_path / "fused.pt")
    argv = weights_commands(tmp_path / "fused.pt", models, write_dataset(tmp_path / "set", names="abc"))[command]
    refused_without_writing(command, argv, ["is fused", "BatchNorm", "best.pt"], (tmp_path, models))


def test_a_fused_model_prunes_by_filter_norm(tmp_path, models):
    from ultralytics import YOLO

    from yoloslim.cli import main

    fused = YOLO(models / "best.pt")
    fused.model.fuse()
    fused.save(tmp_path / "fused.pt")
    assert main(["prune", "--weights", str(tmp_path / "fused.pt"), "--method", "l1", "--dry-run"]) == 0


def test_finetune_refuses_a_dataset_of_other_classes_before_its_run(tmp_path, models, refused_without_writing):
    argv = [*data_commands(models / "best.pt")["finetune"], "--data", write_dataset(tmp_path / "set")]
    refused_without_writing("finetune", argv, ["detects 3 classes", "has 2"], [tmp_path, models])


def test_a_folder_given_as_weights_is_named_a_folder(tmp_path, models, refused_without_writing):
    (tmp_path / "run.pt").mkdir()
    refused_without_writing("prune", ["prune", "--weights", "run.pt"], ["run.pt is a folder"], [tmp_path, models])


def test_a_file_that_holds_no_checkpoint_is_refused_by_prune_and_resume(tmp_path, models, refused_without_writing):
    import torch

    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    words = ["tensor.pt", "Tensor"]
    refused_without_writing("prune", ["prune", "--weights", "tensor.pt"], words, [tmp_path, models])
    refused_without_writing("finetune", ["finetune", "--weights", "tensor.pt", "--resume"], words, [tmp_path, models])


def test_an_unwritable_project_is_one_line(tmp_path, models, refused_without_writing):
    (tmp_path / "file").write_text("")
    project = tmp_path / "file" / "p"
    argv = ["train", "--weights", models / "best.pt", "--epochs", 1, "--imgsz", 64, "--project", project]
    refused_without_writing("train", argv, ["file", "Not a directory"], [tmp_path, models])


def test_a_relative_dataset_is_kept_as_an_absolute_path(tmp_path, tiny_data, monkeypatch):
    from yoloslim.data import resolve_data

    monkeypatch.chdir(tiny_data.parent)
    resolved = resolve_data(tiny_data.name)
    assert resolved.is_absolute() and resolved == tiny_data.absolute()
