"""A restricted pickle module for torch.load: it resolves only the names an original YOLOv5 repository checkpoint
holds, and maps the repository's own classes onto yoloslim's.

Unpickling calls whatever the file names, so a checkpoint from elsewhere can run code when loaded. Here every global
the file names must be on the allow-list below; any other stops the load with NotAllowed before it is called:
- the original detection modules (`models.common.*`, `models.yolo.Detect`, `models.yolo.Model`/`DetectionModel`),
  mapped onto yoloslim.models' classes of the same names;
- the torch layers those models contain, and torch's tensor rebuilders (weights in FP16 or FP32);
- what train.py stores beside the model: an `opt` dict or argparse Namespace (paths in it become pure paths, so a
  checkpoint written on Windows loads elsewhere), numpy scalars and arrays (best_fitness), sets and ordered dicts.

Pass this module itself as torch.load's pickle_module.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import pathlib
import pickle

from torch import _utils as torch_utils
from torch import nn

from yoloslim.models import common, yolo

# The original repository's classes of other tasks, named in refusals so their owners know why.
OTHER_TASKS = {
    "models.yolo.SegmentationModel": "segmentation",
    "models.yolo.Segment": "segmentation",
    "models.common.Proto": "segmentation",
    "models.yolo.ClassificationModel": "classification",
    "models.common.Classify": "classification",
}

ORIGINAL_CLASSES = {
    **{
        f"models.common.{cls.__name__}": cls
        for cls in (
            common.Conv,
            common.Bottleneck,
            common.C3,
            common.SPPF,
            common.Concat,
            common.Focus,
            common.SPP,
            common.BottleneckCSP,
        )
    },
    "models.yolo.Detect": yolo.Detect,
    "models.yolo.Model": yolo.DetectionModel,
    "models.yolo.DetectionModel": yolo.DetectionModel,
}
_TORCH_LAYERS = (
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.Sequential,
    nn.ModuleList,
    nn.MaxPool2d,
    nn.Upsample,
    nn.Identity,
    nn.SiLU,
    nn.Hardswish,
    nn.LeakyReLU,
    nn.ReLU,
)


def _numpy_rebuilders() -> dict:
    """numpy arrays and scalars pickle under numpy.core (numpy 1) or numpy._core (numpy 2); either loads."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1 before 1.26 has no numpy._core
        from numpy.core import multiarray
    names = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype, "_codecs.encode": _latin1_bytes}
    for package in ("numpy.core", "numpy._core"):
        names[f"{package}.multiarray._reconstruct"] = multiarray._reconstruct
        names[f"{package}.multiarray.scalar"] = multiarray.scalar
    return names


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """Pickle protocol 2, which torch.save uses, has no bytes opcode: bytes (an array's data) are pickled as a call
    to _codecs.encode(text, "latin1"). Only that call is allowed, no other codec."""
    if encoding != "latin1":
        raise NotAllowed(f"_codecs.encode with {encoding!r}")
    return codecs.encode(text, encoding)


def _path_classes() -> dict:
    """Every spelling of a pickled path (Python 3.13 moved them to pathlib._local) onto a pure path of its flavour."""
    flavours = {"Posix": pathlib.PurePosixPath, "Windows": pathlib.PureWindowsPath}
    return {
        f"{package}.{prefix}{flavour}Path": cls
        for package in ("pathlib", "pathlib._local")
        for prefix in ("", "Pure")
        for flavour, cls in flavours.items()
    }


ALLOWED = {
    **ORIGINAL_CLASSES,
    **{f"{cls.__module__}.{cls.__qualname__}": cls for cls in _TORCH_LAYERS},
    "torch._utils._rebuild_tensor_v2": torch_utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch_utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch_utils._rebuild_parameter_with_state,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "__builtin__.set": set,  # pickle protocol 2, which torch.save uses, spells builtins the Python 2 way
    "argparse.Namespace": argparse.Namespace,
    **_path_classes(),
    **_numpy_rebuilders(),
}


class NotAllowed(pickle.UnpicklingError):
    """The file names a global outside the allow-list; `name` is its full dotted name."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        qualified = f"{module}.{name}"
        if qualified not in ALLOWED:
            raise NotAllowed(qualified)
        return ALLOWED[qualified]


def load(file, **kwargs):
    return Unpickler(file, **kwargs).load()
