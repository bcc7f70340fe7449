"""ONNX export of the original YOLOv5 repository's anchor-based models (yoloslim.models), as its export.py writes them.

One input `images` (batch, 3, imgsz, imgsz) float32 RGB in [0, 1], letterboxed; one output `output0` (batch, anchors,
5 + classes): every anchor's box centre x, centre y, width, height in input pixels, its sigmoid objectness and its
sigmoid class scores, before any threshold or NMS (anchors = 3 per cell of each level). The runtime multiplies the
objectness into the class scores, as the original's NMS does. Opset 17 through the TorchScript exporter, simplified
with onnxslim, node names under /model.N/ as in Ultralytics' exports, so the FP16 and INT8 passes find the head
(the last layer, the Detect) by the same rule.

The metadata holds what the original's detect.py and val.py read from an ONNX (`stride`, `names`), what the runtime
reads (`imgsz`, `batch`, `task`), and `head`: "anchor".
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from yoloslim.runtime.onnx_meta import ANCHOR_HEAD, HEAD_KEY
from yoloslim.utils.files import atomic_path


class BoxesOutput(nn.Module):
    """Runs a classic DetectionModel's layers and returns the eval-mode boxes alone (the original's export mode). It
    holds the model's `model` and `save` under the same names, so the exported node names are /model.N/..."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.save = model.model, model.save

    def forward(self, x):
        from yoloslim.models import DetectionModel

        return DetectionModel.forward(self, x)[0]


def export_classic_onnx(model, target: Path, imgsz: int, batch: int, dynamic: bool, opset: int) -> Path:
    """Write `model` (a classic DetectionModel, FP32) to `target` as an ONNX with the anchor head's output."""
    import onnx
    import onnxslim

    from yoloslim.export.onnx import set_metadata

    wrapper = BoxesOutput(model).eval()
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 1: "anchors"}}
    with atomic_path(target) as tmp:
        torch.onnx.export(
            wrapper,
            torch.zeros(batch, 3, imgsz, imgsz),
            str(tmp),
            opset_version=opset,
            dynamo=False,
            input_names=["images"],
            output_names=["output0"],
            dynamic_axes=axes if dynamic else None,
        )
        slim = onnxslim.slim(onnx.load(str(tmp)))
        set_metadata(slim, classic_metadata(model, imgsz, batch))
        onnx.save(slim, str(tmp))
    return target


def classic_metadata(model, imgsz: int, batch: int) -> dict:
    names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
    return {
        "description": "YOLOv5 model of the original repository (anchor-based head), exported by yoloslim",
        "stride": int(model.stride.max()),
        "task": "detect",
        "batch": batch,
        "imgsz": [imgsz, imgsz],
        "names": {int(k): str(v) for k, v in names.items()},
        HEAD_KEY: ANCHOR_HEAD,
    }
