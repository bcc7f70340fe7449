"""Inference backends of the device runtime. Each takes a preprocessed NCHW float32 batch and returns the model's
output in the layout postprocess reads: (batch, 4 + classes, anchors), or an end-to-end head's (batch, k, 6) rows.
An anchor-based head's output (the original YOLOv5 repository's) comes through postprocess.nms_layout. Each records
its model's `head` (onnx_meta.HEADS), which also picks the NMS defaults; pre- and postprocessing are shared
(preprocess.py, postprocess.py)."""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from yoloslim.runtime.onnx_meta import ANCHOR_FREE_HEAD, ANCHOR_HEAD, END_TO_END_HEAD, check_output_shape, head_kind
from yoloslim.runtime.postprocess import nms_layout
from yoloslim.utils.errors import YoloslimError, first_line


class HeadOutput:
    """The `head` attribute every backend sets (the default: Ultralytics' anchor-free head), and what follows from
    it; the input size it runs at; and `with load_backend(...) as backend:`, which closes a backend that holds device
    memory (TensorRT's)."""

    head = ANCHOR_FREE_HEAD
    fixed_imgsz: Optional[int] = None  # the input's own size, where the model has one
    trained_imgsz: Optional[int] = None  # the size it was trained or exported at, from its metadata
    stride = 32

    @property
    def end_to_end(self) -> bool:
        return self.head == END_TO_END_HEAD

    def input_size(self, requested: Optional[int] = None) -> int:
        """The square input size to letterbox to: the model's own if its input is fixed, else `requested` rounded up
        to a multiple of the stride (as Ultralytics' predictor does), else the size in its metadata, else 640."""
        if self.fixed_imgsz:
            return self.fixed_imgsz
        if requested:
            return -(-requested // self.stride) * self.stride
        return self.trained_imgsz or 640

    def close(self) -> None:
        """Release what the backend holds outside Python's reach; nothing for ONNX Runtime and torch."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def session_options(threads: int):
    """ONNX Runtime session options for `threads` intra-op threads, as every timing and inference here uses them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # ONNX Runtime's threads spin after each run by default; on a 2-core edge CPU (and when models are timed
    # interleaved) the spinning steals the cores that preprocessing or the next model need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRuntimeBackend(HeadOutput):
    """ONNX Runtime on the CPU (or a provider the caller names), with its thread count pinned and recorded. Takes a
    float32 batch of up to the model's batch size, whatever its input's type and batch (FP16 inputs of a GPU export,
    a static batch larger than the images given)."""

    def __init__(self, path: str, threads: Optional[int] = None, providers=("CPUExecutionProvider",)):
        import onnxruntime as ort

        self.threads = threads or os.cpu_count() or 1
        options = session_options(self.threads)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        except Exception as e:  # ONNX Runtime raises its own types for damaged, truncated and unsupported files
            raise YoloslimError(f"ONNX Runtime cannot load {path} ({first_line(e)}); export the model again") from e
        self.input = self.session.get_inputs()[0]
        meta = self.session.get_modelmeta().custom_metadata_map
        self.names: Dict[int, str] = ast.literal_eval(meta["names"]) if "names" in meta else {}
        self.head = head_kind(meta)
        check_output_shape(self.session.get_outputs()[0].shape, self.head, len(self.names), Path(path).name)
        self.float16 = self.input.type == "tensor(float16)"
        if len(self.input.shape) != 4:
            raise YoloslimError(
                f"{Path(path).name} takes a {len(self.input.shape)}-d input; a detector takes NCHW images"
            )
        batch, _, height, width = self.input.shape
        self.batch = batch if isinstance(batch, int) else None
        if isinstance(height, int) and isinstance(width, int) and height != width:
            raise YoloslimError(
                f"{Path(path).name} takes {height}x{width} images; yoloslim letterboxes to a square: export it with "
                "one imgsz"
            )
        self.fixed_imgsz = height if isinstance(height, int) else None
        self.trained_imgsz = int(ast.literal_eval(meta.get("imgsz", "[640]"))[0])
        self.stride = int(meta.get("stride", 32))
        self.path = Path(path)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        if self.batch is not None and n != self.batch:
            if n > self.batch:
                raise YoloslimError(f"{self.path.name} takes batches of {self.batch} images, got {n}")
            batch = np.concatenate([batch, np.zeros((self.batch - n, *batch.shape[1:]), batch.dtype)])
        if self.float16:
            batch = batch.astype(np.float16)
        output = self.session.run(None, {self.input.name: batch})[0][:n]
        return nms_layout(output.astype(np.float32, copy=False), self.head)


class TorchBackend(HeadOutput):
    """A .pt checkpoint, Ultralytics' or the original YOLOv5 repository's, run with torch (host side; torch is
    imported only when one is loaded)."""

    def __init__(self, weights, threads: Optional[int] = None):
        import torch

        from yoloslim.graph import has_one_to_one_branch
        from yoloslim.models import DetectionModel as ClassicDetectionModel
        from yoloslim.utils.checks import load_detection_checkpoint, trained_imgsz

        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        model, ckpt = load_detection_checkpoint(weights, classic=True)
        self.model = model.float().eval()
        names = model.names
        self.names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else dict(names)
        self.stride = int(max(model.stride))
        self.trained_imgsz = trained_imgsz(ckpt)
        if isinstance(model, ClassicDetectionModel):
            self.head = ANCHOR_HEAD
        elif has_one_to_one_branch(model):  # the branch the ONNX export keeps, so both read the same boxes
            model.model[-1].end2end = True
            self.head = END_TO_END_HEAD

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(batch))
        return nms_layout((out[0] if isinstance(out, (tuple, list)) else out).numpy(), self.head)


def load_backend(weights, threads: Optional[int] = None):
    """The backend for a model file, chosen by its suffix: .onnx, .engine or .pt."""
    weights = Path(weights)
    if not weights.is_file():
        raise YoloslimError(f"model file {weights} does not exist; pass --weights path/to/model.pt|.onnx|.engine")
    if weights.suffix == ".onnx":
        return OnnxRuntimeBackend(str(weights), threads=threads)
    if weights.suffix in (".engine", ".plan"):
        from yoloslim.runtime.tensorrt import TensorRTBackend

        return TensorRTBackend(weights)
    if weights.suffix == ".pt":
        return TorchBackend(weights, threads=threads)
    raise YoloslimError(f"{weights.name}: unknown model format; pass a .pt, .onnx or .engine file")
