"""Datasets: the embedded synthetic default and resolution of the user's `--data`."""

from __future__ import annotations

from pathlib import Path

from yoloslim.utils.checks import check_data_yaml


def resolve_data(data: str | Path | None) -> Path:
    """The dataset yaml to use: the user's, checked, or the embedded synthetic dataset when none is given."""
    if data is None:
        from yoloslim.data.synthetic import ensure_synthetic_dataset

        return ensure_synthetic_dataset()
    return check_data_yaml(data)
