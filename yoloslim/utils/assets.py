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


def shipped_file(folder: str, name: str) -> Path:
    """Return the path of a shipped file, e.g. shipped_file("weights", "yolov5n-synthetic.pt")."""
    candidates = [_CHECKOUT_ROOT / folder / name]
    try:
        # joined before str(): a namespace package's files() is a MultiplexedPath, whose str() is not a path
        candidates.insert(0, Path(str(resources.files(_PACKAGE_OF_FOLDER[folder]) / name)))
    except ModuleNotFoundError:  # running from a checkout that was never installed
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise YoloslimError(
        f"the shipped file {folder}/{name} is missing from this install; reinstall yoloslim, or pass --weights"
    )


def is_shipped(path: str | Path) -> bool:
    """Whether `path` is one of the shipped weights: outputs made from it belong under runs/, not in the install."""
    try:
        return Path(path).resolve() == shipped_file("weights", Path(path).name).resolve()
    except YoloslimError:
        return False


def cache_dir() -> Path:
    """Folder for generated data; YOLOSLIM_CACHE overrides the per-user default."""
    root = (
        os.environ.get("YOLOSLIM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "yoloslim"
    )
    return Path(root)
