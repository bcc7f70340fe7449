"""The original YOLOv5 repository's anchor-based detectors (its releases v6.0 to v7.0 and the earlier Focus, SPP and
BottleneckCSP layouts), implemented by yoloslim: common.py holds the layers, yolo.py the Detect head and the model,
unpickle.py the allow-list that maps a checkpoint's pickled classes onto them, checkpoint.py the loader.

    from yoloslim.models import load_classic_checkpoint
    model, ckpt = load_classic_checkpoint("best.pt")  # FP32, eval mode: model(images) -> (boxes, raw maps)
"""

from yoloslim.models.checkpoint import load_classic_checkpoint
from yoloslim.models.yolo import Detect, DetectionModel, yolov5_layout

__all__ = ["Detect", "DetectionModel", "load_classic_checkpoint", "yolov5_layout"]
