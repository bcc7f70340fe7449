"""Datasets: the embedded synthetic default, Ultralytics' YOLO format (splits, labels, image suffixes) and the check of
the user's `data`."""

from __future__ import annotations

from pathlib import Path

from yoloslim.data.dataset import IMAGE_SUFFIXES, label_path, read_labels, split_images

__all__ = ["IMAGE_SUFFIXES", "label_path", "read_labels", "resolve_data", "split_images"]


def resolve_data(data: str | Path | None) -> Path:
    """The dataset yaml to use: the user's, once check_dataset finds it usable, or the embedded synthetic dataset when
    none is given."""
    if data is None:
        from yoloslim.data.synthetic import ensure_synthetic_dataset

        return ensure_synthetic_dataset()
    from yoloslim.data.check import check_dataset

    return check_dataset(data)
