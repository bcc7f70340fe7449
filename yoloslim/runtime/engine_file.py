"""The .engine file: Ultralytics' header (4-byte little-endian length, JSON metadata) followed by the TensorRT plan.

With this header `YOLO("model.engine")` loads yoloslim's engines too. `--raw` writes the bare plan instead, for
trtexec and DeepStream. Reading accepts both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

from yoloslim.utils.files import write_bytes_atomic


def write_engine_file(path, plan: bytes, metadata: Optional[dict] = None) -> Path:
    """Write the plan (with the metadata header unless metadata is None) atomically; return the path."""
    path = Path(path)
    header = b""
    if metadata is not None:
        meta = json.dumps(metadata).encode()
        header = len(meta).to_bytes(4, byteorder="little", signed=True) + meta
    write_bytes_atomic(path, header + plan)
    return path


def read_engine_header(path) -> Tuple[int, dict]:
    """(offset of the plan, metadata); (0, {}) for a bare plan."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        n = int.from_bytes(f.read(4), byteorder="little", signed=True)
        if 0 < n <= size - 4:
            try:
                meta = json.loads(f.read(n).decode())
            except (UnicodeDecodeError, ValueError):
                return 0, {}
            if isinstance(meta, dict):
                return 4 + n, meta
    return 0, {}


def read_engine_file(path) -> Tuple[dict, bytes]:
    """The metadata and the plan bytes of an engine file."""
    offset, meta = read_engine_header(path)
    with open(path, "rb") as f:
        f.seek(offset)
        return meta, f.read()
