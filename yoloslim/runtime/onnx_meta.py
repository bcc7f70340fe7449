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


def is_end_to_end(meta: Dict[str, object]) -> bool:
    """Whether a model's head selects its own boxes (Ultralytics' `end2end` key: YOLO26 exported without NMS), so
    its output is (batch, k, 6) rows of x1, y1, x2, y2, score, class and needs no NMS."""
    return str(meta.get("end2end", False)) == "True"
