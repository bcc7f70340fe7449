"""`yoloslim detect`: run a model on an image, a folder, a video or a camera, with the shared pre/postprocessing.

Outputs go under runs/detect/<name> as Ultralytics does (a new numbered folder each run). A camera or stream that
drops is reopened instead of ending the run.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Tuple

import cv2
import numpy as np

from yoloslim.data.dataset import IMAGE_SUFFIXES
from yoloslim.runtime.postprocess import Detections, default_iou, postprocess
from yoloslim.runtime.preprocess import preprocess
from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.files import write_text_atomic

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm"}
WINDOW = "yoloslim"
FALLBACK_FPS = 30.0  # a saved stream's frame rate where its source does not say


@dataclass
class DetectConfig:
    conf: float = 0.25
    iou: Optional[float] = None  # None: the model family's own (postprocess.default_iou: 0.7, 0.45 for anchor heads)
    imgsz: Optional[int] = None  # None: the model's own (a fixed input's, else the size in its metadata)
    save: bool = False
    show: bool = False
    project: str = "runs/detect"
    name: str = "predict"
    reconnect_attempts: int = 30  # per drop, one per second, for cameras and streams


def new_run_dir(project: str, name: str) -> Path:
    """project/name, or project/name2, name3... whichever does not exist yet."""
    root = Path(project)
    candidate, n = root / name, 2
    while candidate.exists():
        candidate, n = root / f"{name}{n}", n + 1
    candidate.mkdir(parents=True)
    return candidate


def image_sources(source: str) -> Iterator[Tuple[str, np.ndarray, None]]:
    """Each image of a file or a folder (not its videos, nor hidden files such as macOS' ._ copies), as (name, image,
    no frame rate); an image of a folder that OpenCV cannot read is skipped with a warning."""
    path = Path(source)
    folder = path.is_dir()
    files = [path]
    if folder:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise YoloslimError(
            f"folder {source} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); pass a video as a source of its own"
        )
    for file in files:
        image = cv2.imread(str(file))
        if image is None and folder:
            print(f"detect: warning: cannot read image {file}; skipped", file=sys.stderr)
            continue
        if image is None:
            raise YoloslimError(f"cannot read image {file}; check the file")
        yield file.name, image, None


def open_capture(source: str) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
    return capture


def stream_frames(source: str, reconnect_attempts: int) -> Iterator[Tuple[str, np.ndarray, float]]:
    """Frames of a video file, camera index or stream URL, as (name, frame, the source's frame rate, else 30);
    a live source that drops is reopened."""
    live = source.isdigit() or "://" in source
    capture = open_capture(source)
    if not capture.isOpened():
        raise YoloslimError(f"cannot open {source}; check the camera index, file path or stream URL")
    index = 0
    while True:
        ok, frame = capture.read()
        if ok:
            yield f"frame{index:06d}", frame, capture.get(cv2.CAP_PROP_FPS) or FALLBACK_FPS
            index += 1
            continue
        if not live:
            return
        capture.release()
        capture = _reopen(source, reconnect_attempts)
        if capture is None:
            raise YoloslimError(f"{source} dropped and did not come back after {reconnect_attempts} tries")


def _reopen(source: str, attempts: int) -> Optional[cv2.VideoCapture]:
    for _ in range(attempts):
        time.sleep(1.0)
        capture = open_capture(source)
        if capture.isOpened():
            return capture
    return None


def draw(image: np.ndarray, det: Detections, names: dict, fps: Optional[float]) -> np.ndarray:
    out = image.copy()
    for (x1, y1, x2, y2), score, cls in zip(det.boxes.astype(int), det.scores, det.classes):
        colour = tuple(int(c) for c in np.random.default_rng(int(cls)).integers(64, 255, 3))
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, 2)
        cv2.putText(
            out,
            f"{names.get(int(cls), int(cls))} {score:.2f}",
            (x1, max(y1 - 4, 10)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5,
            colour,
            1,
        )
    if fps is not None:
        cv2.putText(out, f"{fps:.1f} FPS", (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 255, 0), 2)
    return out


def check_source(source: str) -> bool:
    """Refuse a file or folder that does not exist (before a model is loaded, so the error names the source);
    return whether the source is read as a stream of frames (a video file, a camera index or a URL)."""
    live = source.isdigit() or "://" in source
    if not live and not Path(source).exists():
        raise YoloslimError(
            f"source {source} does not exist; pass an image, a folder, a video, a camera index or a URL"
        )
    return live or Path(source).suffix.lower() in VIDEO_SUFFIXES


def check_display() -> None:
    """Refuse --show where no window can open, before any work: without a display OpenCV's GUI build aborts the
    process, and the headless build (this package's dependency) has no windows at all."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise YoloslimError("--show needs a display and none is set (DISPLAY); use --save and open the run folder")
    try:
        cv2.namedWindow(WINDOW)
    except cv2.error as e:
        raise YoloslimError(
            "--show needs OpenCV with windows (pip install opencv-python; opencv-python-headless has none), or use "
            "--save"
        ) from e


def detect(backend, source: str, config: DetectConfig) -> Path:
    """Run `backend` over `source`; return the run folder (labels and, with save, annotated images/video)."""
    from tqdm import tqdm

    is_stream = check_source(source)
    if config.show:
        check_display()
    run = new_run_dir(config.project, config.name)
    (run / "labels").mkdir()
    frames = stream_frames(source, config.reconnect_attempts) if is_stream else image_sources(source)
    imgsz = backend.input_size(config.imgsz)
    names = getattr(backend, "names", {}) or {}
    iou = default_iou(backend.head, "detect") if config.iou is None else config.iou
    writer, fps = None, None
    for name, image, source_fps in tqdm(frames, desc="detect", unit="frame"):
        t0 = time.perf_counter()
        batch, boxes = preprocess([image], imgsz)
        det = postprocess(backend(batch), boxes, conf=config.conf, iou=iou, end_to_end=backend.end_to_end)[0]
        elapsed = time.perf_counter() - t0
        fps = 1 / elapsed if fps is None else 0.9 * fps + 0.1 / elapsed
        _write_labels(run / "labels" / f"{Path(name).stem}.txt", det, image.shape[:2])
        if config.save or config.show:
            annotated = draw(image, det, names, fps)
            if config.save:
                writer = _save(run, name, annotated, writer, source_fps)
            if config.show:
                cv2.imshow(WINDOW, annotated)
                if cv2.waitKey(1) & 0xFF == ord("q"):
                    break
    if writer is not None:
        writer.release()
    return run


def _write_labels(path: Path, det: Detections, shape) -> None:
    """YOLO txt: class cx cy w h (normalised) confidence."""
    h, w = shape
    lines = []
    for (x1, y1, x2, y2), score, cls in zip(det.boxes, det.scores, det.classes):
        lines.append(
            f"{int(cls)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f} "
            f"{score:.4f}"
        )
    write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))


def _save(run: Path, name: str, image: np.ndarray, writer, stream_fps: Optional[float]):
    """An image as its own file, or a stream's frame into output.mp4 at the source's frame rate."""
    if stream_fps is None:
        cv2.imwrite(str(run / name), image)
        return None
    if writer is None:
        h, w = image.shape[:2]
        writer = cv2.VideoWriter(str(run / "output.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), stream_fps, (w, h))
    writer.write(image)
    return writer
