"""Regenerate the device self-test assets shipped in yoloslim/runtime/assets/ (run on the host, rarely).

    python tools/make_selftest_onnx.py

selftest.onnx is a very narrow YOLOv5 detector (random weights, seed 0) at 64 px, small enough to ship, with its FP16
copy (selftest-fp16.onnx, which TensorRT 11 needs for FP16) and its Q/DQ INT8 copy (selftest-int8.onnx, calibrated on
a small generated dataset), each written by yoloslim's own export passes. selftest.npz holds an input and ONNX
Runtime's output of each file (keys images, fp32, fp16, int8), so `yoloslim doctor --selftest` and `pytest -m jetson`
compare the device's TensorRT engines against a reference without ONNX Runtime, onnx or torch there.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

ASSETS = ROOT / "yoloslim" / "runtime" / "assets"
IMGSZ = 64


def spread_outputs(model):
    """Make a randomly initialised detector's outputs depend on its input. At initialisation the features fade through
    the layers, so every box and score equals its bias whatever the input (and an engine that computed garbage would
    still match): set each BatchNorm's statistics from one batch of noise, so every layer passes unit-scale features,
    then shrink the head's last convolutions and zero the class biases, so scores spread over (0, 1)."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0  # the next batch's statistics replace the running ones
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1)))
    model.eval()
    head = model.model[-1]
    for box, cls in zip(head.cv2, head.cv3):
        box[-1].weight.data *= 0.05
        cls[-1].weight.data *= 0.05
        cls[-1].bias.data.zero_()
    return model


def main() -> None:
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG_DICT

    from yoloslim.data.synthetic import default_config, ensure_synthetic_dataset
    from yoloslim.export.fp16 import convert_fp16
    from yoloslim.export.onnx import export_onnx
    from yoloslim.export.qdq import quantize_int8
    from yoloslim.runtime.backends import OnnxRuntimeBackend

    cfg = yaml.safe_load((Path(__import__("ultralytics").__file__).parent / "cfg/models/v5/yolov5.yaml").read_text())
    cfg["scales"] = {"n": [0.33, 0.0625, 1024]}  # a sixteenth of the width: ~40k parameters
    cfg["nc"] = 2
    torch.manual_seed(0)
    model = spread_outputs(DetectionModel(cfg, nc=2, verbose=False))
    model.args, model.names = dict(DEFAULT_CFG_DICT), {0: "a", 1: "b"}
    with tempfile.TemporaryDirectory() as tmp:
        pt = Path(tmp) / "selftest.pt"
        torch.save({"model": model, "train_args": dict(DEFAULT_CFG_DICT)}, pt)
        fp32 = export_onnx(pt, imgsz=IMGSZ, out=ASSETS / "selftest.onnx")
        small = dataclasses.replace(
            default_config(), image_size=IMGSZ, splits={"train": 32, "val": 4}, object_size=(8, 48)
        )
        data = ensure_synthetic_dataset(small, root=Path(tmp) / "data")
        files = {
            "fp32": fp32,
            "fp16": convert_fp16(fp32, out=ASSETS / "selftest-fp16.onnx"),
            "int8": quantize_int8(fp32, data, out=ASSETS / "selftest-int8.onnx", count=32),
        }
    x = np.random.default_rng(0).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    outputs = {precision: OnnxRuntimeBackend(str(path), threads=1)(x) for precision, path in files.items()}
    np.savez_compressed(ASSETS / "selftest.npz", images=x, **outputs)
    for path in files.values():
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
    print(f"wrote {ASSETS / 'selftest.npz'}")


if __name__ == "__main__":
    main()
