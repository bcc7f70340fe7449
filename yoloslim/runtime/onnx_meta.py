"""Ultralytics' metadata from an ONNX file, without the onnx package (the device side has only tensorrt and numpy).

ModelProto keeps its metadata as field 14, repeated StringStringEntryProto {1: key, 2: value}; everything else in the
file is skipped by wire type, so this reads only what it needs.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Tuple

from yoloslim.utils.errors import YoloslimError


def _varint(data: bytes, pos: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes):
    """(field number, wire type, value) of each top-level field; length-delimited values as bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def read_onnx_metadata(path) -> Dict[str, object]:
    """The model's metadata_props, with Python literals (names, imgsz, stride...) parsed."""
    meta = {}
    for number, wire, value in _fields(Path(path).read_bytes()):
        if number == 14 and wire == 2:
            entry = {n: v.decode() for n, w, v in _fields(value) if w == 2}
            key, text = entry.get(1, ""), entry.get(2, "")
            try:
                meta[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                meta[key] = text
    return meta


# Which head a model has, hence how its output is read (the ONNX metadata key `head`, which yoloslim's exports write):
# - anchor: the original YOLOv5 repository's, (batch, anchors, 5 + classes) rows of box, objectness, class scores;
# - anchor-free: Ultralytics' (YOLOv5u, YOLOv8, YOLO11), (batch, 4 + classes, anchors), class scores without
#   objectness;
# - end-to-end: a head that selects its own boxes (YOLO26 exported without NMS), (batch, k, 6) rows of x1, y1, x2,
#   y2, score, class, needing no NMS.
HEAD_KEY = "head"
ANCHOR_HEAD, ANCHOR_FREE_HEAD, END_TO_END_HEAD = "anchor", "anchor-free", "end-to-end"
HEADS = (ANCHOR_HEAD, ANCHOR_FREE_HEAD, END_TO_END_HEAD)


def _literal(value):
    """A metadata value as Python reads it: ONNX Runtime hands over the text, read_onnx_metadata the literal."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def head_kind(meta: Dict[str, object]) -> str:
    """The model's head, one of HEADS: the `head` key, else (a file Ultralytics exported) end-to-end where its
    `end2end` key says so or NMS was exported into the graph (`nms=True`: the same x1, y1, x2, y2, score, class
    rows), anchor-free otherwise. A model of another task than detection is refused."""
    task = str(meta.get("task", "detect"))
    if task != "detect":
        raise YoloslimError(
            f"this is a {task} model; yoloslim runs detection models (see the supported models in the README)"
        )
    head = str(meta.get(HEAD_KEY, ""))
    if head in HEADS:
        return head
    args = _literal(meta.get("args", {}))
    embedded_nms = isinstance(args, dict) and args.get("nms") is True
    return END_TO_END_HEAD if _literal(meta.get("end2end", False)) is True or embedded_nms else ANCHOR_FREE_HEAD


def check_output_shape(shape, head: str, classes: int, model: str) -> None:
    """Refuse a model whose first output is not what its head writes for `classes` classes (a segmentation or pose
    model without metadata, or metadata that belongs to another model); open dimensions and unknown classes pass."""
    known = [d if isinstance(d, int) and d > 0 else None for d in shape]
    if len(known) != 3:
        raise YoloslimError(f"{model} outputs a tensor of shape {tuple(shape)}; a detector's output has 3 dimensions")
    expected = {END_TO_END_HEAD: (2, 6), ANCHOR_HEAD: (2, 5 + classes), ANCHOR_FREE_HEAD: (1, 4 + classes)}
    axis, size = expected[head]
    if known[axis] is not None and (classes or head == END_TO_END_HEAD) and known[axis] != size:
        raise YoloslimError(
            f"{model} outputs {known[axis]} values per box where a {head} detector of {classes} classes outputs "
            f"{size}; pass a detection model exported by yoloslim or Ultralytics"
        )
