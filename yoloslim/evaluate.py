"""mAP for every backend, with the runtime's own preprocessing and NMS, and bootstrap confidence intervals.

The AP arithmetic is COCO's: per class, detections of all images sorted by score are matched greedily (highest score
first) to the best still-unmatched ground truth of that class with IoU >= t, for t in 0.50:0.05:0.95; precision is made
monotone and read at 101 recall points; classes without ground truth are left out of the mean. Every detection the NMS
keeps counts (pycocotools' COCOeval with maxDets 300, not its default 100). Small validation sets make a point of mAP
meaningless without an interval, so a 95% bootstrap interval over images comes with it.

Detections come from the runtime's NMS with the model family's validator settings: confidence 0.001, at most 300
detections, every class above the confidence per anchor (multi-label), NMS IoU 0.7 (Ultralytics) or 0.6 with
objectness x class score as confidence (the original YOLOv5 repository's val.py, for its anchor-based models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from yoloslim.data import read_labels, split_images
from yoloslim.runtime.backends import load_backend
from yoloslim.runtime.postprocess import Detections, default_iou, postprocess
from yoloslim.runtime.preprocess import preprocess
from yoloslim.utils.errors import YoloslimError

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass
class ImageRecord:
    """One image's matched detections: scores (D,), classes (D,), tp (D, 10) per IoU threshold; gt classes (G,)."""

    scores: np.ndarray
    classes: np.ndarray
    tp: np.ndarray
    gt_classes: np.ndarray


@dataclass
class EvalResult:
    map50: float
    map: float  # mAP50-95
    precision: float
    recall: float
    per_class_ap: dict  # class name -> AP50-95
    ci95: dict = field(default_factory=dict)  # "map50" / "map" -> (low, high)
    images: int = 0
    instances: int = 0

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def match_image(det: Detections, gt_boxes: np.ndarray, gt_classes: np.ndarray) -> ImageRecord:
    """COCO matching within one image: per class, by descending score, to the best unmatched ground truth."""
    tp = np.zeros((len(det), len(IOU_THRESHOLDS)), dtype=bool)
    for c in np.unique(det.classes):
        d_idx = np.nonzero(det.classes == c)[0]
        d_idx = d_idx[np.argsort(-det.scores[d_idx], kind="mergesort")]
        g_idx = np.nonzero(gt_classes == c)[0]
        if not len(g_idx):
            continue
        ious = box_iou_matrix(det.boxes[d_idx], gt_boxes[g_idx])
        for t, threshold in enumerate(IOU_THRESHOLDS):
            taken = np.zeros(len(g_idx), dtype=bool)
            for row, d in enumerate(d_idx):
                candidates = np.where(taken, -1.0, ious[row])
                best = int(candidates.argmax())
                if candidates[best] >= threshold:
                    taken[best] = True
                    tp[d, t] = True
    return ImageRecord(det.scores, det.classes, tp, gt_classes)


def average_precision(tp: np.ndarray, n_gt: int) -> np.ndarray:
    """101-point interpolated AP per IoU threshold for one class; `tp` (D, T) is sorted by descending score."""
    tps = np.cumsum(tp, axis=0)
    fps = np.cumsum(~tp, axis=0)
    recall = tps / n_gt
    precision = tps / np.maximum(tps + fps, 1e-12)
    ap = np.zeros(tp.shape[1])
    for t in range(tp.shape[1]):
        p = np.maximum.accumulate(precision[::-1, t])[::-1]  # monotone: best precision at this recall or beyond
        idx = np.searchsorted(recall[:, t], RECALL_POINTS, side="left")
        ap[t] = np.where(idx < len(p), p[np.minimum(idx, len(p) - 1)], 0.0).mean()
    return ap


def _concat(records: list, attr: str, width: int | None = None) -> np.ndarray:
    parts = [getattr(r, attr) for r in records]
    if not parts:
        return np.zeros((0, width) if width else 0)
    return np.concatenate(parts)


def class_aps(records: list, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """AP (C, 10) per class and threshold, and the ground-truth count per class (C,)."""
    scores, classes = _concat(records, "scores"), _concat(records, "classes")
    tp = _concat(records, "tp", len(IOU_THRESHOLDS)).astype(bool)
    n_gt = np.bincount(_concat(records, "gt_classes").astype(np.int64), minlength=num_classes)[:num_classes]
    aps = np.zeros((num_classes, len(IOU_THRESHOLDS)))
    for c in np.nonzero(n_gt)[0]:
        mask = classes == c
        order = np.argsort(-scores[mask], kind="mergesort")
        if mask.any():
            aps[c] = average_precision(tp[mask][order], int(n_gt[c]))
    return aps, n_gt


def mean_ap(records: list, num_classes: int) -> tuple[float, float]:
    aps, n_gt = class_aps(records, num_classes)
    present = n_gt > 0
    if not present.any():
        return 0.0, 0.0
    return float(aps[present, 0].mean()), float(aps[present].mean())


def precision_recall_at_best_f1(records: list, num_classes: int) -> tuple[float, float]:
    """Mean precision and recall over classes at IoU 0.5, at the confidence that maximises their mean F1."""
    scores, classes = _concat(records, "scores"), _concat(records, "classes")
    tp = _concat(records, "tp", len(IOU_THRESHOLDS))[:, 0].astype(bool) if len(scores) else np.zeros(0, bool)
    n_gt = np.bincount(_concat(records, "gt_classes").astype(np.int64), minlength=num_classes)[:num_classes]
    present = np.nonzero(n_gt)[0]
    if not len(present):
        return 0.0, 0.0
    grid = np.linspace(0, 1, 1001)
    p, r = np.zeros((len(present), len(grid))), np.zeros((len(present), len(grid)))
    for i, c in enumerate(present):
        s, t = scores[classes == c], tp[classes == c]
        above = s[None, :] >= grid[:, None]
        hits = (above & t[None, :]).sum(1)
        p[i] = hits / np.maximum(above.sum(1), 1)
        r[i] = hits / n_gt[c]
    f1 = (2 * p * r / np.maximum(p + r, 1e-12)).mean(0)
    best = int(f1.argmax())
    return float(p[:, best].mean()), float(r[:, best].mean())


def bootstrap_ci(records: list, num_classes: int, samples: int = 1000, seed: int = 0) -> dict:
    """95% percentile intervals of mAP50 and mAP50-95 over images resampled with replacement."""
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            mean_ap([records[i] for i in rng.integers(0, len(records), len(records))], num_classes)
            for _ in range(samples)
        ]
    )
    low, high = np.percentile(values, [2.5, 97.5], axis=0)
    return {"map50": (float(low[0]), float(high[0])), "map": (float(low[1]), float(high[1]))}


def paired_bootstrap_delta(
    records_a: list, records_b: list, num_classes: int, samples: int = 1000, seed: int = 0
) -> dict:
    """mAP(b) - mAP(a) on the same images, with a 95% interval from resampling images jointly (paired)."""
    if len(records_a) != len(records_b):
        raise ValueError("paired comparison needs the same images for both models")
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(samples):
        idx = rng.integers(0, len(records_a), len(records_a))
        a, b = mean_ap([records_a[i] for i in idx], num_classes), mean_ap([records_b[i] for i in idx], num_classes)
        deltas.append((b[0] - a[0], b[1] - a[1]))
    a, b = mean_ap(records_a, num_classes), mean_ap(records_b, num_classes)
    low, high = np.percentile(np.array(deltas), [2.5, 97.5], axis=0)
    return {"map50": (b[0] - a[0], float(low[0]), float(high[0])), "map": (b[1] - a[1], float(low[1]), float(high[1]))}


def summarise(records: list, names: dict, bootstrap: int = 1000, seed: int = 0) -> EvalResult:
    num_classes = max(len(names), 1)
    aps, n_gt = class_aps(records, num_classes)
    map50, map_ = mean_ap(records, num_classes)
    precision, recall = precision_recall_at_best_f1(records, num_classes)
    return EvalResult(
        map50=map50,
        map=map_,
        precision=precision,
        recall=recall,
        per_class_ap={names.get(c, str(c)): float(aps[c].mean()) for c in np.nonzero(n_gt)[0]},
        ci95=bootstrap_ci(records, num_classes, bootstrap, seed) if bootstrap else {},
        images=len(records),
        instances=int(n_gt.sum()),
    )


# -- backends and the evaluation loop ----------------------------------------------------------------------------------


def predict_records(
    backend: Callable,
    images: Iterable[Path],
    imgsz: int,
    conf: float = 0.001,
    iou: float | None = None,
    progress: bool = True,
) -> list:
    """Run the backend over the images (batch 1) and match each image's detections to its labels. `iou` None: the
    NMS IoU of the model family's own validator (0.7 Ultralytics', 0.6 the original YOLOv5 repository's val.py)."""
    import cv2

    if iou is None:
        iou = default_iou(backend.head, "eval")
    records = []
    images = list(images)
    iterator = images
    if progress:
        from tqdm import tqdm

        iterator = tqdm(images, desc="evaluating", unit="img")
    for path in iterator:
        image = cv2.imread(str(path))
        if image is None:
            raise YoloslimError(f"cannot read image {path}; remove it from the split or replace it")
        batch, boxes = preprocess([image], imgsz)
        det = postprocess(
            backend(batch), boxes, conf=conf, iou=iou, max_det=300, multi_label=True, end_to_end=backend.end_to_end
        )[0]
        gt_boxes, gt_classes = read_labels(path, image.shape[:2])
        records.append(match_image(det, gt_boxes, gt_classes))
    return records


def model_records(
    weights: str | Path,
    data: str | Path | None = None,
    imgsz: int | None = None,
    split: str = "val",
    threads: int | None = None,
) -> tuple[list, dict]:
    """One model's matched detections on every image of the split, and the dataset's class names."""
    from yoloslim.data import resolve_data

    images, names = split_images(resolve_data(data), split)
    if not images:
        raise YoloslimError(f"split '{split}' has no images")
    with load_backend(weights, threads) as backend:
        return predict_records(backend, images, backend.input_size(imgsz)), names


def evaluate(
    weights: str | Path,
    data: str | Path | None = None,
    imgsz: int | None = None,
    split: str = "val",
    bootstrap: int = 1000,
    threads: int | None = None,
) -> EvalResult:
    """mAP50, mAP50-95 (with 95% bootstrap intervals), precision, recall and per-class AP of one model."""
    records, names = model_records(weights, data, imgsz, split, threads)
    return summarise(records, names, bootstrap=bootstrap)
