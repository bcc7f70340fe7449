import dataclasses
import os
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A few small synthetic images: enough for training steps, not for accuracy."""
    from yoloslim.data.synthetic import default_config, ensure_synthetic_dataset

    config = dataclasses.replace(default_config(), image_size=96, splits={"train": 8, "val": 4}, object_size=(8, 48))
    return ensure_synthetic_dataset(config, root=tmp_path_factory.mktemp("data"))


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
