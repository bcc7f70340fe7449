import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import SHARED

from yoloslim.runtime import detect as detect_module
from yoloslim.runtime.detect import stream_frames

USER_WEIGHTS = SHARED / "weights" / "license_plate_yolov5nu.pt"
IMAGES = SHARED / "data" / "license_plate" / "images" / "val"
needs_shared = pytest.mark.skipif(not USER_WEIGHTS.exists(), reason="../shared is not beside the project")


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    from yoloslim.export.onnx import export_onnx

    return export_onnx(USER_WEIGHTS, imgsz=320, out=tmp_path_factory.mktemp("m") / "lp.onnx")


def run(*argv, cwd):
    return subprocess.run(
        [sys.executable, "-m", "yoloslim.cli", *argv], capture_output=True, text=True, timeout=300, cwd=cwd
    )


@needs_shared
def test_detect_on_a_folder_writes_labels_and_images_under_runs(onnx_model, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for image in sorted(IMAGES.glob("*.jpg"))[:3]:
        (folder / image.name).write_bytes(image.read_bytes())
    for expected in ("predict", "predict2"):  # a second run gets a new folder, as in Ultralytics
        result = run("detect", "--weights", str(onnx_model), "--source", str(folder), "--save", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        out = tmp_path / "runs" / "detect" / expected
        assert len(list((out / "labels").glob("*.txt"))) == 3 and len(list(out.glob("*.jpg"))) == 3
    rows = [line.split() for f in (out / "labels").glob("*.txt") for line in f.read_text().splitlines()]
    assert rows and all(len(r) == 6 and 0 <= float(r[1]) <= 1 for r in rows)


@needs_shared
def test_detect_on_a_video(onnx_model, tmp_path):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (416, 416))
    for image in sorted(IMAGES.glob("*.jpg"))[:5]:
        writer.write(cv2.resize(cv2.imread(str(image)), (416, 416)))
    writer.release()
    result = run(
        "detect", "--weights", str(onnx_model), "--source", str(video), "--save", "--name", "vid", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "runs" / "detect" / "vid"
    assert len(list((out / "labels").glob("*.txt"))) == 5 and (out / "output.mp4").stat().st_size > 0


def test_missing_source_is_a_one_line_error(tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"")
    result = run("detect", "--weights", str(tmp_path / "missing.onnx"), "--source", "x.jpg", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


class FlakyCamera:
    """Stand-in for cv2.VideoCapture of a live camera: delivers two frames, drops, then delivers again."""

    opened = 0

    def __init__(self, frames):
        FlakyCamera.opened += 1
        self.frames = frames

    def isOpened(self):
        return True

    def read(self):
        return (True, self.frames.pop()) if self.frames else (False, None)

    def release(self):
        pass


def test_a_dropped_camera_is_reopened(monkeypatch):
    batches = [[np.zeros((4, 4, 3), np.uint8)] * 2, [np.ones((4, 4, 3), np.uint8)] * 2]
    monkeypatch.setattr(detect_module, "open_capture", lambda source: FlakyCamera(batches.pop(0) if batches else []))
    monkeypatch.setattr(detect_module.time, "sleep", lambda s: None)
    frames = stream_frames("0", reconnect_attempts=1)
    got = [next(frames)[1].max() for _ in range(4)]
    assert got == [0, 0, 1, 1] and FlakyCamera.opened == 2
