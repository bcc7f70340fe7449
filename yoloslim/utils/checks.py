"""Input checks shared by every stage: weights files and dataset definitions.

Each check turns what would otherwise be a traceback from deep inside torch or Ultralytics into a YoloslimError
that names the file, the problem and the fix.
"""

from __future__ import annotations

from pathlib import Path

from yoloslim.utils.errors import YoloslimError

_ORIGINAL_YOLOV5_HINT = "originally trained with https://github.com/ultralytics/yolov5"


def load_detection_checkpoint(weights: str | Path):
    """Load an Ultralytics detection checkpoint; return (model, checkpoint dict) or raise a YoloslimError."""
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint

    path = Path(weights)
    if not path.is_file():
        raise YoloslimError(f"weights file {path} does not exist; pass --weights path/to/best.pt")
    if path.suffix != ".pt":
        raise YoloslimError(f"{path} is not a PyTorch checkpoint (.pt); pass the best.pt that Ultralytics training wrote")
    try:
        model, ckpt = load_checkpoint(path)
    except (TypeError, ModuleNotFoundError) as e:
        if _ORIGINAL_YOLOV5_HINT in str(e):
            raise YoloslimError(
                f"{path} is an anchor-based checkpoint from the original YOLOv5 repository, which yoloslim cannot "
                "read; retrain it with the ultralytics package (model yolov5n.yaml) and pass that best.pt"
            ) from None
        raise YoloslimError(f"{path} is not a loadable Ultralytics checkpoint ({_first_line(e)}); pass another file") from None
    task = getattr(model, "task", None)
    if task != "detect" or type(model) is not DetectionModel:
        kind = task or type(model).__name__
        raise YoloslimError(f"{path} is a {kind} model; yoloslim slims detection models only, pass a detection best.pt")
    return model, ckpt


def check_data_yaml(data: str | Path) -> Path:
    path = Path(data)
    if not path.is_file():
        raise YoloslimError(
            f"dataset yaml {path} does not exist; pass --data path/to/data.yaml, or leave --data out to use the "
            "embedded synthetic dataset"
        )
    if path.suffix not in {".yaml", ".yml"}:
        raise YoloslimError(f"{path} is not a dataset yaml; pass --data path/to/data.yaml")
    return path


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
