"""Reading the checkpoints that the original YOLOv5 repository's train.py writes (best.pt, last.pt), without that
repository: restricted unpickling (unpickle.py) onto yoloslim's classic modules, then checks that what came out is a
detection model that runs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from yoloslim.models import unpickle
from yoloslim.models.yolo import Detect, DetectionModel
from yoloslim.utils.errors import YoloslimError, first_line

_READS = "the original YOLOv5 repository's detection checkpoints (Conv, C3, SPPF, Focus, SPP, BottleneckCSP, Detect)"


def load_classic_checkpoint(weights: str | Path) -> tuple[DetectionModel, dict]:
    """Load a checkpoint of the original YOLOv5 repository; return (FP32 model in eval mode, checkpoint dict).

    As the original's loader does, the EMA model is used when the checkpoint holds one (an unfinished last.pt).
    The model object is also the checkpoint's, converted to FP32 in place. Anything else raises a YoloslimError.
    """
    path = Path(weights)
    if not path.is_file():
        raise YoloslimError(f"weights file {path} does not exist; pass the path of a best.pt")
    ckpt = _unpickle(path)
    model = _detection_model(ckpt, path)
    _update_earlier_releases(model)
    return model.float().eval(), ckpt


def _unpickle(path: Path):
    try:
        return torch.load(path, map_location="cpu", pickle_module=unpickle, weights_only=False)
    except unpickle.NotAllowed as e:
        raise YoloslimError(_refusal(path, e.name)) from None
    except Exception as e:  # from the allowed names alone, any failure means a damaged or truncated file
        raise YoloslimError(
            f"{path} cannot be read as a PyTorch checkpoint ({first_line(e)}); it is damaged or truncated, copy it "
            "again from the run that wrote it"
        ) from None


def _refusal(path: Path, name: str) -> str:
    if name in unpickle.OTHER_TASKS:
        return (
            f"{path} is a {unpickle.OTHER_TASKS[name]} checkpoint of the original YOLOv5 repository ({name}); "
            "yoloslim slims detection models only, pass a detection best.pt"
        )
    if name.startswith("models."):
        return f"{path} uses {name}, which yoloslim does not implement: it reads {_READS}; pass a model of those layers"
    return (
        f"{path} refers to {name}, which is not part of an original YOLOv5 repository checkpoint, so it was not "
        "loaded (unpickling it could run code); pass the best.pt that the repository's train.py wrote"
    )


def _detection_model(ckpt, path: Path) -> DetectionModel:
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    problem = _layout_problem(model)
    if problem:
        raise YoloslimError(
            f"{path} holds no detection model of the original YOLOv5 repository ({problem}); yoloslim reads {_READS}, "
            "pass the best.pt that the repository's train.py wrote"
        )
    return model


def _layout_problem(model) -> str | None:
    """What keeps `model` from running as a classic detection model, or None."""
    if not isinstance(model, DetectionModel):
        return f"its model is a {type(model).__name__}" if model is not None else "no 'model' entry"
    layers = getattr(model, "model", None)
    if not isinstance(layers, nn.Sequential) or not len(layers) or not isinstance(layers[-1], Detect):
        return "its layers do not end in a Detect head"
    if not isinstance(getattr(model, "save", None), list) or any(
        not hasattr(layer, "f") or not hasattr(layer, "i") for layer in layers
    ):
        return "its layers lack the indices that route their inputs"
    return None


def _update_earlier_releases(model: DetectionModel) -> None:
    """What the original's own loader updates in checkpoints of earlier releases and torch versions."""
    head = model.model[-1]
    if not isinstance(head.anchor_grid, list):  # before v6.0, a buffer; yoloslim computes it from the anchors
        # A list of its levels, as the original's loader since v6.0 makes it (its Detect recomputes them), holding
        # their values rather than its placeholders, so that a pruned model saved from it runs on earlier releases'
        # code too, which reads them.
        levels = list(head.anchor_grid.unbind(0))
        del head.anchor_grid
        head.anchor_grid = levels
    for m in model.modules():
        if isinstance(m, nn.Upsample) and not hasattr(m, "recompute_scale_factor"):  # pickled by torch < 1.11
            m.recompute_scale_factor = None
