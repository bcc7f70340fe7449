"""Ultralytics' metadata from an ONNX file, without the onnx package (the device side has only tensorrt and numpy).

ModelProto keeps its metadata as field 14, repeated StringStringEntryProto {1: key, 2: value}; everything else in the
file is skipped by wire type, so this reads only what it needs.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Tuple


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


def head_kind(meta: Dict[str, object]) -> str:
    """The model's head, one of HEADS: the `head` key, else (a file Ultralytics exported) end-to-end where its
    `end2end` key says so, anchor-free otherwise."""
    head = str(meta.get(HEAD_KEY, ""))
    if head in HEADS:
        return head
    return END_TO_END_HEAD if str(meta.get("end2end", False)) == "True" else ANCHOR_FREE_HEAD
