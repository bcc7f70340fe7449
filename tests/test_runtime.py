import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from yoloslim.runtime.postprocess import nms, postprocess
from yoloslim.runtime.preprocess import letterbox, preprocess

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shape", [(416, 416), (480, 640), (640, 360), (100, 37)])
def test_letterbox_matches_ultralytics(shape):
    from ultralytics.data.augment import LetterBox

    image = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
    ours, box = letterbox(image, 320)
    theirs = LetterBox(new_shape=(320, 320), auto=False)(image=image)
    np.testing.assert_array_equal(ours, theirs)
    assert box.orig_shape == shape


def test_nms_keeps_best_and_separates_classes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    # the same two overlapping boxes as different classes both survive the class-aware pass
    raw = np.zeros((1, 6, 2), np.float32)
    raw[0, :4, 0], raw[0, :4, 1] = [5, 5, 10, 10], [5.5, 5.5, 9, 9]
    raw[0, 4, 0], raw[0, 5, 1] = 0.9, 0.8
    _, boxes_ = preprocess([np.zeros((64, 64, 3), np.uint8)], 64)
    found = postprocess(raw, boxes_, conf=0.25, iou=0.5)[0]
    assert sorted(found.classes.tolist()) == [0, 1]


def test_runtime_reproduces_ultralytics_predictions(shipped_weights, synthetic_data):
    """Our letterbox + NMS on the model's raw output gives Ultralytics' own boxes on the images it was measured on."""
    import cv2
    from ultralytics import YOLO

    from yoloslim.runtime.backends import TorchBackend

    backend = TorchBackend(shipped_weights)
    model = YOLO(str(shipped_weights))
    images = sorted((synthetic_data.parent / "images" / "val").glob("*.jpg"))[:6]
    compared = 0
    for path in images:
        image = cv2.imread(str(path))
        batch, boxes = preprocess([image], 320)
        ours = postprocess(backend(batch), boxes, conf=0.25, iou=0.7)[0]
        theirs = model.predict(image, imgsz=320, conf=0.25, iou=0.7, verbose=False)[0].boxes
        assert len(ours) == len(theirs), path.name
        if len(ours):
            order = np.argsort(-ours.scores)
            np.testing.assert_allclose(ours.boxes[order], theirs.xyxy.numpy(), atol=0.5)
            np.testing.assert_allclose(ours.scores[order], theirs.conf.numpy(), atol=1e-3)
            np.testing.assert_array_equal(ours.classes[order], theirs.cls.numpy().astype(int))
            compared += len(ours)
    assert compared >= 20  # boxes enough for the comparison to mean something


def ultralytics_onnx(weights: Path, folder: Path) -> Path:
    """Ultralytics' own ONNX export (what `yolo export` gives a user), made from a copy so that nothing is written
    beside the shipped weights."""
    from ultralytics import YOLO

    copy = folder / weights.name
    copy.write_bytes(weights.read_bytes())
    return Path(YOLO(str(copy)).export(format="onnx", imgsz=320, opset=17, simplify=False, dynamic=False))


@pytest.mark.parametrize("exporter", ["yoloslim", pytest.param("ultralytics", marks=pytest.mark.slow)])
def test_onnx_runtime_path_runs_without_torch(exporter, shipped_weights, shipped_onnx, synthetic_data, tmp_path):
    """The device runtime must import and run with torch and ultralytics made unimportable."""
    from yoloslim.data.synthetic import default_config

    onnx = shipped_onnx if exporter == "yoloslim" else ultralytics_onnx(shipped_weights, tmp_path)
    image = next((synthetic_data.parent / "images" / "val").glob("*.jpg"))
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'torch', 'torchvision', 'ultralytics'}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    probe = (
        "import sys, cv2\n"
        "from yoloslim.runtime.backends import OnnxRuntimeBackend\n"
        "from yoloslim.runtime.preprocess import preprocess\n"
        "from yoloslim.runtime.postprocess import postprocess\n"
        "b = OnnxRuntimeBackend(sys.argv[1], threads=1)\n"
        "x, boxes = preprocess([cv2.imread(sys.argv[2])], b.imgsz)\n"
        "d = postprocess(b(x), boxes)[0]\n"
        "assert 'torch' not in sys.modules and 'ultralytics' not in sys.modules\n"
        "print(len(d))\n"
        "print(b.names)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"}
    result = subprocess.run(
        [sys.executable, "-c", probe, str(onnx), str(image)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    detections, names = result.stdout.strip().splitlines()[-2:]
    assert int(detections) > 0 and names == str(dict(enumerate(default_config().classes)))
    blocked = subprocess.run(
        [sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True, timeout=60
    )
    assert blocked.returncode != 0  # the blocker itself works


def test_runtime_supports_python_3_8():
    """JetPack 5 ships Python 3.8: the runtime's syntax and stdlib use must allow it."""
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("vermin")),
            "-t=3.8-",
            "--violations",
            "--no-tips",
            "--eval-annotations",
            str(ROOT / "yoloslim" / "runtime"),
            str(ROOT / "yoloslim" / "utils" / "errors.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout


def test_doctor_reports_a_machine_without_nvcc(monkeypatch):
    from yoloslim.runtime import doctor

    monkeypatch.setattr(doctor.shutil, "which", lambda command: None)  # nothing on PATH, no /usr/local/cuda
    assert doctor.facts()["nvcc"] is None
    assert "| nvcc | not found |" in doctor.report()
