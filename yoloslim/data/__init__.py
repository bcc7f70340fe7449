"""Datasets: the embedded synthetic default, Ultralytics' YOLO format (splits, labels, image suffixes) and the check of
the user's `data`."""

from __future__ import annotations

from pathlib import Path

from yoloslim.data.dataset import IMAGE_SUFFIXES, label_path, read_labels, split_images
from yoloslim.utils.errors import YoloslimError

__all__ = ["IMAGE_SUFFIXES", "check_classes", "label_path", "read_labels", "resolve_data", "split_images"]


def resolve_data(data: str | Path | None) -> Path:
    """The dataset yaml to use: the user's, once check_dataset finds it usable, or the embedded synthetic dataset when
    none is given."""
    if data is None:
        from yoloslim.data.synthetic import ensure_synthetic_dataset

        return ensure_synthetic_dataset()
    from yoloslim.data.check import check_dataset

    return check_dataset(data)


def check_classes(model, weights: str | Path, data: Path) -> None:
    """Refuse a dataset of another number of classes than the model detects, before any run folder is made: training
    a pruned model on it cannot rebuild the head, and an unpruned model would be scored on classes it does not have."""
    names = split_images(data, "val")[1]
    if len(model.names) != len(names):
        raise YoloslimError(
            f"{Path(weights).name} detects {len(model.names)} classes and {data} has {len(names)}; pass the dataset "
            "it was trained on"
        )
