"""Decoding the model output, NMS and mapping boxes back to the original image: numpy only.

The exported detection head outputs (batch, 4 + classes, anchors): box centre x, y, width, height in input pixels,
then per-class scores (already sigmoid). NMS follows Ultralytics' non_max_suppression: candidates above `conf`, at
most `max_nms` of them by score, class-aware (classes never suppress each other), greedy IoU suppression, at most
`max_det` kept, optionally one candidate per class above `conf` per anchor (multi_label, as Ultralytics' validator).

An end-to-end head (YOLO26's one-to-one branch, exported NMS-free) has already selected its boxes: (batch, k, 6) rows
of x1, y1, x2, y2 in input pixels, score, class, best first. They are only filtered by `conf` and cut at `max_det`, as
Ultralytics does; IoU and multi_label do not apply (the head's top-k may already list one anchor under two classes).

The original YOLOv5 repository's anchor-based head outputs (batch, anchors, 5 + classes): box, objectness, class
scores. Its NMS takes objectness x class score as each class's confidence (and drops anchors whose objectness alone
is under `conf`, which that product implies), then proceeds as above; objectness_scores turns such an output into the
layout above, so the same NMS serves both. Its defaults differ: NMS IoU 0.45 in its detect.py, 0.6 in its val.py
(default_iou).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np

from yoloslim.runtime.onnx_meta import ANCHOR_HEAD
from yoloslim.runtime.preprocess import Letterbox

# NMS IoU by head and purpose: Ultralytics' predictor and validator use 0.7; the original YOLOv5 repository's
# detect.py 0.45 and val.py 0.6.
_DEFAULT_IOU = {"detect": 0.7, "eval": 0.7}
_DEFAULT_IOU_ANCHOR = {"detect": 0.45, "eval": 0.6}


@dataclass
class Detections:
    """Boxes (N, 4) xyxy in original image pixels, scores (N,), classes (N,) int."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    out = np.empty_like(boxes)
    half_w, half_h = boxes[:, 2] / 2, boxes[:, 3] / 2
    out[:, 0], out[:, 1] = boxes[:, 0] - half_w, boxes[:, 1] - half_h
    out[:, 2], out[:, 3] = boxes[:, 0] + half_w, boxes[:, 1] + half_h
    return out


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of `boxes`."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, max_det: int = 300) -> np.ndarray:
    """Greedy NMS: indices kept, highest score first, at most `max_det` (boxes are kept in score order, so stopping
    there changes nothing but the time: evaluation's thousands of low-confidence candidates)."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size and len(keep) < max_det:
        best = order[0]
        keep.append(best)
        rest = order[1:]
        order = rest[box_iou(boxes[best], boxes[rest]) <= iou]
    return np.array(keep, dtype=np.int64)


def default_iou(head: str, purpose: str) -> float:
    """The NMS IoU that the tools of a model's own family use for `purpose` ("detect" or "eval")."""
    return (_DEFAULT_IOU_ANCHOR if head == ANCHOR_HEAD else _DEFAULT_IOU)[purpose]


def objectness_scores(output: np.ndarray) -> np.ndarray:
    """An anchor-based head's (batch, anchors, 5 + classes) output as (batch, 4 + classes, anchors): the box, then
    objectness x class score for each class, the confidences the original YOLOv5 repository's NMS ranks."""
    scores = output[..., 5:] * output[..., 4:5]
    return np.concatenate((output[..., :4], scores), axis=-1).transpose(0, 2, 1)


def nms_layout(output: np.ndarray, head: str) -> np.ndarray:
    """A model's raw output in the layout postprocess reads: an anchor-based head's through objectness_scores, any
    other as it is."""
    return objectness_scores(output) if head == ANCHOR_HEAD else output


def non_max_suppression(
    output: np.ndarray,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    multi_label: bool = False,
    max_nms: int = 30000,
) -> List[Detections]:
    """Per image of a (batch, 4 + nc, anchors) output: detections in input-pixel xyxy coordinates."""
    max_wh = 7680  # class offset that keeps classes apart in one NMS pass
    results = []
    for pred in output:
        pred = pred.T  # (anchors, 4 + nc)
        boxes, class_scores = xywh_to_xyxy(pred[:, :4]), pred[:, 4:]
        if multi_label:
            anchor, cls = np.nonzero(class_scores > conf)
            boxes, scores = boxes[anchor], class_scores[anchor, cls]
        else:
            cls = class_scores.argmax(1)
            scores = class_scores[np.arange(len(cls)), cls]
            boxes, scores, cls = boxes[scores > conf], scores[scores > conf], cls[scores > conf]
        if len(scores) > max_nms:
            top = np.argsort(-scores, kind="stable")[:max_nms]
            boxes, scores, cls = boxes[top], scores[top], cls[top]
        keep = nms(boxes + cls[:, None] * max_wh, scores, iou, max_det)
        results.append(
            Detections(boxes[keep].astype(np.float32), scores[keep].astype(np.float32), cls[keep].astype(np.int64))
        )
    return results


def select_end_to_end(output: np.ndarray, conf: float = 0.25, max_det: int = 300) -> List[Detections]:
    """Per image of a (batch, k, 6) end-to-end output: its rows above `conf`, at most `max_det`, in input pixels."""
    results = []
    for pred in output:
        pred = pred[pred[:, 4] > conf][:max_det]
        results.append(
            Detections(pred[:, :4].astype(np.float32), pred[:, 4].astype(np.float32), pred[:, 5].astype(np.int64))
        )
    return results


def scale_to_original(det: Detections, box: Letterbox) -> Detections:
    """Undo the letterbox: input-pixel boxes to original-image pixels, clipped to the image."""
    boxes = det.boxes.copy()
    boxes[:, [0, 2]] = (boxes[:, [0, 2]] - box.pad_x) / box.gain_x
    boxes[:, [1, 3]] = (boxes[:, [1, 3]] - box.pad_y) / box.gain_y
    h, w = box.orig_shape
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    return Detections(boxes, det.scores, det.classes)


def postprocess(
    output: np.ndarray,
    boxes: list,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    multi_label: bool = False,
    end_to_end: bool = False,
) -> List[Detections]:
    """Model output batch -> detections in each original image's pixels; `end_to_end` for a head that selects its
    own boxes (no NMS)."""
    if end_to_end:
        found = select_end_to_end(output, conf=conf, max_det=max_det)
    else:
        found = non_max_suppression(output, conf=conf, iou=iou, max_det=max_det, multi_label=multi_label)
    return [scale_to_original(d, b) for d, b in zip(found, boxes)]
