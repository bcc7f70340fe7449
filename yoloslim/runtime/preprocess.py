"""Letterbox preprocessing, the one place it lives: inference, evaluation and INT8 calibration all use it.

Matches Ultralytics' LetterBox (square target, centred, grey 114 padding, linear resize, scale-up allowed), so a
model sees the same pixels here as under Ultralytics' own predictor with a fixed input size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import cv2
import numpy as np

PAD_VALUE = 114


@dataclass(frozen=True)
class Letterbox:
    """How an image was fitted into the model input: scale per axis and padding (left, top), in pixels."""

    gain_x: float
    gain_y: float
    pad_x: int
    pad_y: int
    orig_shape: Tuple[int, int]  # (height, width)


def letterbox(image: np.ndarray, size: int) -> Tuple[np.ndarray, Letterbox]:
    """Resize `image` (HxWx3 BGR uint8) to fit a size x size square, keeping its aspect ratio, and pad the rest."""
    h, w = image.shape[:2]
    r = min(size / h, size / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    if (new_w, new_h) != (w, h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    padded = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return padded, Letterbox(new_w / w, new_h / h, left, top, (h, w))


def to_input(images: np.ndarray) -> np.ndarray:
    """NHWC BGR uint8 batch -> NCHW RGB float32 in [0, 1], contiguous (what the ONNX and TensorRT models take)."""
    return np.ascontiguousarray(images[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def preprocess(images: list, size: int) -> Tuple[np.ndarray, list]:
    """Letterbox a list of BGR images into one model input batch."""
    boxed = [letterbox(im, size) for im in images]
    return to_input(np.stack([b[0] for b in boxed])), [b[1] for b in boxed]
