"""Writing a classic model back in the original YOLOv5 repository's own format, so that its detect.py, val.py and
export.py load it unchanged, and without yoloslim installed.

A pickle names each object's class by its module path; yoloslim's classic classes live under yoloslim.models, which
the original's code cannot import. OriginalNamesPickler writes them under the paths the original repository gives
them instead (models.common.C3, models.yolo.Detect, models.yolo.DetectionModel or models.yolo.Model, as the input
checkpoint had them). Since yoloslim's classes keep the original's attribute names, each unpickles into the original
class with the state that class expects. Nothing is renamed or patched at run time: only the names written change.
"""

from __future__ import annotations

import pickle
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

import torch

from yoloslim.models import unpickle
from yoloslim.models.yolo import DetectionModel, original_path
from yoloslim.utils.checks import pickled_globals
from yoloslim.utils.files import atomic_path
from yoloslim.utils.metadata import set_checkpoint_metadata

# What the original's strip_optimizer() sets in a finished checkpoint: a pruned model has no training state left.
TRAINING_STATE = ("optimizer", "best_fitness", "ema", "updates")


class OriginalNamesPickler(pickle._Pickler):
    """A pickler that writes yoloslim's classic classes under their original repository's paths.

    The pure-Python pickler, because only its save_global can write a name that does not import here; `names`
    (class -> dotted original path) is set on a subclass made per checkpoint, since torch.save builds the pickler
    from its pickle_module's `Pickler` attribute with no other arguments."""

    names: dict[type, str] = {}

    def save_global(self, obj, name=None):
        original = self.names.get(obj)
        if original is None:
            return super().save_global(obj, name)
        module, _, qualname = original.rpartition(".")
        self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())  # the opcode every protocol reads
        self.memoize(obj)
        return None


def original_names(source: Path | None = None) -> dict[type, str]:
    """yoloslim's classic class -> the path to pickle it under: the one the checkpoint `source` used, else v7.0's (a
    v6.1 or older checkpoint names its model models.yolo.Model, which v7.0 still defines; DetectionModel is newer)."""
    names = {cls: original_path(cls) for cls in set(unpickle.ORIGINAL_CLASSES.values())}
    for name in (".".join(g) for g in pickled_globals(source)) if source else []:
        if name in unpickle.ORIGINAL_CLASSES:
            names[unpickle.ORIGINAL_CLASSES[name]] = name
    return names


def save_original_format(model: DetectionModel, ckpt: dict, out: Path, names: dict, metadata: dict) -> None:
    """Write `model` (FP16, as the original saves it) to `out` with the keys of the checkpoint `ckpt`, the training
    state cleared as the original's strip_optimizer() clears it, its classes under `names` (original_names() of the
    checkpoint read), and `metadata` on the model as yoloslim's metadata (yoloslim.utils.metadata), an attribute the
    original's tools never read."""
    model = deepcopy(model).half()
    for p in model.parameters():
        p.requires_grad_(False)
    payload = {key: None if key in TRAINING_STATE else value for key, value in ckpt.items()}
    set_checkpoint_metadata(model, metadata)
    payload["model"] = model
    if "epoch" in payload:
        payload["epoch"] = -1
    pickler = type("Pickler", (OriginalNamesPickler,), {"names": names})
    with atomic_path(out) as tmp:  # torch.save reads a pickle module's name and its Pickler
        torch.save(payload, tmp, pickle_module=SimpleNamespace(__name__=__name__, Pickler=pickler))
