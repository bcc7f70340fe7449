import dataclasses
import os
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import pytest


def pytest_ignore_collect(collection_path, config):
    """`pytest -m jetson` on a device runs with the base install and TensorRT alone: every other test module imports
    torch, so only the device's own modules are collected there."""
    if config.getoption("markexpr") == "jetson" and collection_path.suffix == ".py":
        return None if collection_path.name.startswith("test_jetson_") else True
    return None


def _synthetic_dataset(tmp_path_factory, **changes) -> Path:
    from yoloslim.data.synthetic import default_config, ensure_synthetic_dataset

    config = dataclasses.replace(default_config(), **changes)
    return ensure_synthetic_dataset(config, root=tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A few small synthetic images: enough for training steps, not for accuracy."""
    return _synthetic_dataset(tmp_path_factory, image_size=96, splits={"train": 8, "val": 4}, object_size=(8, 48))


@pytest.fixture(scope="session")
def two_class_data(tmp_path_factory) -> Path:
    """tiny_data with two classes, as many as the shipped TensorRT self-test model detects."""
    return _synthetic_dataset(
        tmp_path_factory,
        image_size=96,
        splits={"train": 8, "val": 4},
        object_size=(8, 48),
        classes=("circle", "square"),
    )


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """The first images of the embedded dataset at full size (each image depends only on its split and index): the
    shipped models were trained on these train images and measured on these val images, so they detect in them."""
    return _synthetic_dataset(tmp_path_factory, splits={"train": 16, "val": 24})


@pytest.fixture(scope="session")
def synthetic_val_data(tmp_path_factory) -> Path:
    """The embedded dataset's whole val split, for checks that need its statistical power (and 16 train images)."""
    from yoloslim.data.synthetic import default_config

    return _synthetic_dataset(tmp_path_factory, splits={"train": 16, "val": default_config().splits["val"]})


@pytest.fixture(scope="session")
def shipped_weights() -> Path:
    """The shipped baseline, trained on the embedded synthetic dataset."""
    from yoloslim.utils.assets import BASELINE, shipped_file

    return shipped_file("weights", BASELINE)


@pytest.fixture(scope="session")
def shipped_sparse_weights() -> Path:
    """The shipped baseline after sparsity training: many BatchNorm gammas at zero."""
    from yoloslim.utils.assets import SPARSE_BASELINE, shipped_file

    return shipped_file("weights", SPARSE_BASELINE)


@pytest.fixture(scope="session")
def shipped_onnx(tmp_path_factory, shipped_weights) -> Path:
    """The shipped baseline exported by yoloslim to ONNX at 320 px, the size it was trained at."""
    from yoloslim.export.onnx import export_onnx

    return export_onnx(shipped_weights, imgsz=320, out=tmp_path_factory.mktemp("onnx") / "synthetic.onnx")


@pytest.fixture
def train_args(tmp_path, tiny_data) -> dict:
    """Ultralytics train arguments for a fast, deterministic run on the tiny dataset."""
    return dict(
        model="yolov5n.yaml",
        data=str(tiny_data),
        imgsz=64,
        batch=4,
        nbs=4,
        epochs=2,
        warmup_epochs=0,
        workers=0,
        seed=0,
        deterministic=True,
        plots=False,
        verbose=False,
        project=str(tmp_path / "runs"),
        name="run",
        exist_ok=True,
    )


@pytest.fixture
def cli(capfd):
    """Run `yoloslim ARGV...` in this process (the interpreter's start-up and imports are paid once per session, not
    per test); return its exit status, what it wrote to file descriptor 2 and to 1. Torch's thread count, which
    `--threads` sets for the process, is restored afterwards."""
    import torch

    from yoloslim.cli import main

    def run(*argv) -> tuple[int, str, str]:
        capfd.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
        out, err = capfd.readouterr()
        return code, err.strip(), out

    threads = torch.get_num_threads()
    yield run
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread than on two cores that other processes share."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
