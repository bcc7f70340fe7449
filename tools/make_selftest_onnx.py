"""Regenerate the device self-test assets shipped in yoloslim/runtime/assets/ (run on the host, rarely).

    python tools/make_selftest_onnx.py

selftest.onnx is a very narrow YOLOv5 detector (random weights, seed 0) at 64 px, small enough to ship;
selftest.npz holds an input and ONNX Runtime's output for it, so `yoloslim doctor --selftest` on a device compares
its TensorRT engine against a reference without needing ONNX Runtime there.
"""

from __future__ import annotations

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


def main() -> None:
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG_DICT

    from yoloslim.export.onnx import export_onnx
    from yoloslim.runtime.backends import OnnxRuntimeBackend

    cfg = yaml.safe_load((Path(__import__("ultralytics").__file__).parent / "cfg/models/v5/yolov5.yaml").read_text())
    cfg["scales"] = {"n": [0.33, 0.0625, 1024]}  # a sixteenth of the width: ~40k parameters
    cfg["nc"] = 2
    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=2, verbose=False).eval()
    model.args, model.names = dict(DEFAULT_CFG_DICT), {0: "a", 1: "b"}
    with tempfile.TemporaryDirectory() as tmp:
        pt = Path(tmp) / "selftest.pt"
        torch.save({"model": model, "train_args": dict(DEFAULT_CFG_DICT)}, pt)
        onnx = export_onnx(pt, imgsz=IMGSZ, out=ASSETS / "selftest.onnx")
    x = np.random.default_rng(0).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    np.savez_compressed(ASSETS / "selftest.npz", images=x, output0=OnnxRuntimeBackend(str(onnx), threads=1)(x))
    print(f"wrote {onnx} ({onnx.stat().st_size / 1e3:.0f} kB) and {ASSETS / 'selftest.npz'}")


if __name__ == "__main__":
    main()
