import subprocess
import sys

import cv2
import numpy as np
import pytest

from yoloslim.runtime import detect as detect_module
from yoloslim.runtime.detect import DetectConfig, check_source, detect, stream_frames
from yoloslim.utils.errors import YoloslimError


@pytest.fixture(scope="module")
def images(synthetic_data):
    return sorted((synthetic_data.parent / "images" / "val").glob("*.jpg"))


def run(*argv, cwd):
    return subprocess.run(
        [sys.executable, "-m", "yoloslim.cli", *argv], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_detect_on_a_folder_writes_labels_and_images_under_runs(shipped_onnx, images, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for image in images[:3]:
        (folder / image.name).write_bytes(image.read_bytes())
    for expected in ("predict", "predict2"):  # a second run gets a new folder, as in Ultralytics
        result = run("detect", "--weights", str(shipped_onnx), "--source", str(folder), "--save", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        out = tmp_path / "runs" / "detect" / expected
        assert len(list((out / "labels").glob("*.txt"))) == 3 and len(list(out.glob("*.jpg"))) == 3
    rows = [line.split() for f in (out / "labels").glob("*.txt") for line in f.read_text().splitlines()]
    assert rows and all(len(r) == 6 and 0 <= float(r[1]) <= 1 for r in rows)


def test_detect_on_a_video(shipped_onnx, images, tmp_path):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (416, 416))
    for image in images[:5]:
        writer.write(cv2.resize(cv2.imread(str(image)), (416, 416)))
    writer.release()
    result = run(
        "detect", "--weights", str(shipped_onnx), "--source", str(video), "--save", "--name", "vid", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "runs" / "detect" / "vid"
    assert len(list((out / "labels").glob("*.txt"))) == 5 and (out / "output.mp4").stat().st_size > 0
    saved = cv2.VideoCapture(str(out / "output.mp4"))
    assert saved.get(cv2.CAP_PROP_FPS) == 10  # the source's rate, so it plays back at its own speed
    saved.release()


def test_missing_source_is_a_one_line_error(shipped_onnx, tmp_path):
    result = run("detect", "--weights", str(shipped_onnx), "--source", "x.jpg", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "yoloslim detect: error: source x.jpg does not exist; pass an image, a folder, a video, a camera index or a URL"
    ]
    assert list(tmp_path.iterdir()) == []  # no run folder


class NeverCalled:
    def __call__(self, batch):
        raise AssertionError("the model ran although the source does not exist")


@pytest.mark.parametrize("source", ["missing.jpg", "missing-folder", "missing.mp4"])
def test_the_source_is_checked_before_anything_runs_or_is_written(tmp_path, source):
    config = DetectConfig(project=str(tmp_path / "runs"))
    with pytest.raises(YoloslimError, match=f"{source} does not exist"):
        detect(NeverCalled(), str(tmp_path / source), config)
    assert list(tmp_path.iterdir()) == []


def test_cameras_urls_and_videos_are_streams_images_and_folders_are_not(tmp_path):
    for name in ("clip.mp4", "a.jpg"):
        (tmp_path / name).write_bytes(b"")
    assert check_source("0") and check_source("rtsp://camera/1") and check_source(str(tmp_path / "clip.mp4"))
    assert not check_source(str(tmp_path / "a.jpg")) and not check_source(str(tmp_path))


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

    def get(self, prop):
        return 0.0  # a camera that does not say its frame rate


def test_a_dropped_camera_is_reopened(monkeypatch):
    batches = [[np.zeros((4, 4, 3), np.uint8)] * 2, [np.ones((4, 4, 3), np.uint8)] * 2]
    monkeypatch.setattr(detect_module, "open_capture", lambda source: FlakyCamera(batches.pop(0) if batches else []))
    monkeypatch.setattr(detect_module.time, "sleep", lambda s: None)
    frames = stream_frames("0", reconnect_attempts=1)
    got = [next(frames)[1].max() for _ in range(4)]
    assert got == [0, 0, 1, 1] and FlakyCamera.opened == 2


def test_an_empty_folder_is_a_one_line_error(shipped_onnx, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "clip.mp4").write_bytes(b"")
    result = run("detect", "--weights", str(shipped_onnx), "--source", "empty", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
        "yoloslim detect: error: folder empty has no images (.avif, .bmp"
    )


def test_show_without_a_display_is_refused_before_any_work(tmp_path, monkeypatch):
    """OpenCV's GUI build aborts the whole process where no display is set; the headless build raises deep inside."""
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(detect_module.sys, "platform", "linux")
    (tmp_path / "a.jpg").write_bytes(b"")
    config = DetectConfig(show=True, project=str(tmp_path / "runs"))
    with pytest.raises(YoloslimError, match="--show needs a display"):
        detect(NeverCalled(), str(tmp_path / "a.jpg"), config)
    monkeypatch.setenv("DISPLAY", ":0")

    def headless(name):
        raise cv2.error("The function is not implemented")

    monkeypatch.setattr(detect_module.cv2, "namedWindow", headless)
    with pytest.raises(YoloslimError, match="opencv-python-headless has none"):
        detect(NeverCalled(), str(tmp_path / "a.jpg"), config)
    assert not (tmp_path / "runs").exists()
