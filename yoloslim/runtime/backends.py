"""Inference backends of the device runtime. Each takes a preprocessed NCHW float32 batch and returns the raw
(batch, 4 + classes, anchors) output; pre- and postprocessing are shared (preprocess.py, postprocess.py)."""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU (or a provider the caller names), with its thread count pinned and recorded."""

    def __init__(self, path: str, threads: Optional[int] = None, providers=("CPUExecutionProvider",)):
        import onnxruntime as ort

        options = ort.SessionOptions()
        self.threads = threads or os.cpu_count() or 1
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        self.input = self.session.get_inputs()[0]
        meta = self.session.get_modelmeta().custom_metadata_map
        self.names: Dict[int, str] = ast.literal_eval(meta["names"]) if "names" in meta else {}
        shape = self.input.shape
        self.imgsz = int(shape[2]) if isinstance(shape[2], int) else int(ast.literal_eval(meta.get("imgsz", "[640]"))[0])
        self.path = Path(path)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input.name: batch})[0]
