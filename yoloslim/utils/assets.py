"""Where the files yoloslim ships (weights/, data/) live, in a checkout and in an installed wheel."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from yoloslim.utils.errors import YoloslimError

# The wheel maps the checkout's top-level folders onto these packages (see pyproject.toml).
_PACKAGE_OF_FOLDER = {"weights": "yoloslim.weights", "data": "yoloslim.datasets"}
_CHECKOUT_ROOT = Path(__file__).resolve().parents[2]
# The embedded default: the shipped baseline and its sparsity-trained model (weights/README.md).
BASELINE = "yolov5n-synthetic.pt"
SPARSE_BASELINE = "yolov5n-synthetic-sparse.pt"


def _shipped_folders(folder: str) -> list[Path]:
    """Where a shipped folder may live: the installed package first, then the checkout."""
    folders = [_CHECKOUT_ROOT / folder]
    try:
        folders.insert(0, Path(str(resources.files(_PACKAGE_OF_FOLDER[folder]))))
    except ModuleNotFoundError:  # running from a checkout that was never installed
        pass
    return folders


def shipped_file(folder: str, name: str) -> Path:
    """Return the path of a shipped file, e.g. shipped_file("weights", "yolov5n-synthetic.pt")."""
    for path in (f / name for f in _shipped_folders(folder)):
        if path.is_file():
            return path
    raise YoloslimError(f"the shipped file {folder}/{name} is missing from this install; reinstall yoloslim, or pass --weights")


def is_shipped(path: str | Path) -> bool:
    """Whether `path` is one of the shipped weights: outputs made from it belong under runs/, not in the install."""
    parent = Path(path).resolve().parent
    return any(parent == f.resolve() for f in _shipped_folders("weights"))


def cache_dir() -> Path:
    """Folder for generated data; YOLOSLIM_CACHE overrides the per-user default."""
    root = os.environ.get("YOLOSLIM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "yoloslim"
    return Path(root)
