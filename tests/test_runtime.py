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
        "x, boxes = preprocess([cv2.imread(sys.argv[2])], b.input_size())\n"
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


def tiny_onnx(path: Path, input_shape, output: np.ndarray | None = None, fp16=False, **metadata) -> Path:
    """A one-layer stand-in for an exported detector: output0 = a 6-channel convolution over the whole image,
    (batch, 6, 1): two classes, one anchor; or, given `output`, that constant (plus 0 x the input's mean). Metadata
    as Ultralytics writes it (text values)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dtype = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    nodes = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT)]
    inits = []
    if output is None:
        weight = np.random.default_rng(0).random((6, 3, input_shape[2], input_shape[3]), dtype=np.float32)
        inits += [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array([0, 6, 1]), "shape")]
        nodes += [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Reshape", ["c", "shape"], ["y"])]
        out_shape = [input_shape[0], 6, 1]
    else:
        inits += [numpy_helper.from_array(output.astype(np.float32), "table")]
        nodes += [
            helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
            helper.make_node("Mul", ["m", "zero"], ["z"]),
            helper.make_node("Add", ["table", "z"], ["y"]),
        ]
        inits += [numpy_helper.from_array(np.array(0, np.float32), "zero")]
        out_shape = list(output.shape)
    nodes.append(helper.make_node("Cast", ["y"], ["output0"], to=dtype))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", dtype, list(input_shape))],
        [helper.make_tensor_value_info("output0", dtype, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in {"names": "{0: 'a', 1: 'b'}", "task": "detect", **metadata}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path


def test_an_fp16_onnx_with_a_static_batch_runs_float32_batches_of_any_size_up_to_it(tmp_path):
    """GPU exports by Ultralytics take and give float16, static exports a fixed batch: both run as float32 batch 1."""
    from yoloslim.runtime.backends import OnnxRuntimeBackend
    from yoloslim.utils.errors import YoloslimError

    batch = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
    reference = OnnxRuntimeBackend(tiny_onnx(tmp_path / "fp32.onnx", (1, 3, 32, 32)), threads=1)(batch)
    backend = OnnxRuntimeBackend(tiny_onnx(tmp_path / "fp16.onnx", (4, 3, 32, 32), fp16=True), threads=1)
    out = backend(batch)
    assert out.dtype == np.float32 and out.shape == (1, 6, 1)
    np.testing.assert_allclose(out, reference, rtol=1e-2)
    assert backend(np.concatenate([batch] * 3)).shape == (3, 6, 1)
    with pytest.raises(YoloslimError, match="takes batches of 4 images, got 5"):
        backend(np.concatenate([batch] * 5))


def test_an_onnx_with_nms_inside_is_read_as_selected_boxes(tmp_path):
    """Ultralytics' `export nms=True` writes end2end False and (batch, 300, 6) rows of x1, y1, x2, y2, score, class,
    the layout of an end-to-end head: read as anchors, its one box would be lost."""
    from yoloslim.runtime.backends import OnnxRuntimeBackend

    rows = np.zeros((1, 300, 6), np.float32)
    rows[0, 0] = [8, 8, 24, 24, 0.9, 1]
    path = tiny_onnx(tmp_path / "nms.onnx", (1, 3, 32, 32), rows, end2end="False", args="{'batch': 1, 'nms': True}")
    backend = OnnxRuntimeBackend(path, threads=1)
    assert backend.end_to_end
    x, boxes = preprocess([np.zeros((32, 32, 3), np.uint8)], backend.input_size())
    found = postprocess(backend(x), boxes, end_to_end=backend.end_to_end)[0]
    assert found.classes.tolist() == [1] and found.boxes.tolist() == [[8, 8, 24, 24]]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: tiny_onnx(p, (1, 3, 32, 32), task="segment"), "this is a segment model; yoloslim runs detection"),
        (lambda p: tiny_onnx(p, (1, 3, 32, 32), names="{0: 'a'}"), "outputs 6 values per box where an? anchor-free"),
        (lambda p: tiny_onnx(p, (1, 3, 32, 64)), "takes 32x64 images; yoloslim letterboxes to a square"),
        (lambda p: tiny_onnx(p, (3, 32, 32), np.zeros((1, 6, 1))), "takes a 3-d input; a detector takes NCHW images"),
        (lambda p: p.write_bytes(b"\x08\x07not an onnx file") and p, "ONNX Runtime cannot load"),
    ],
)
def test_models_the_runtime_would_misread_are_refused_in_one_line(make, message, tmp_path):
    from yoloslim.runtime.backends import load_backend
    from yoloslim.utils.errors import YoloslimError

    with pytest.raises(YoloslimError, match=message) as error:
        load_backend(make(tmp_path / "m.onnx"), threads=1)
    assert "\n" not in str(error.value)


def test_nms_stops_at_max_det_with_the_same_boxes():
    rng = np.random.default_rng(0)
    corners = rng.random((500, 2), dtype=np.float32) * 600
    boxes = np.concatenate([corners, corners + 20], axis=1)
    scores = rng.random(500, dtype=np.float32)
    everything = nms(boxes, scores, 0.7, max_det=10_000)
    assert len(everything) > 50
    assert nms(boxes, scores, 0.7, max_det=50).tolist() == everything[:50].tolist()


def test_the_input_size_is_the_models_own_unless_it_has_none(shipped_weights, shipped_onnx, tmp_path):
    """A fixed input runs at its size; an open one at what the user asks, rounded up to the stride (as Ultralytics'
    predictor rounds), else at the size the model was trained or exported at."""
    from yoloslim.runtime.backends import OnnxRuntimeBackend, TorchBackend

    fixed = OnnxRuntimeBackend(shipped_onnx, threads=1)
    assert fixed.input_size() == 320 and fixed.input_size(640) == 320
    torch_backend = TorchBackend(shipped_weights, threads=1)
    assert torch_backend.input_size() == 320  # the checkpoint's training size
    assert torch_backend.input_size(650) == 672
    dynamic = OnnxRuntimeBackend(
        tiny_onnx(tmp_path / "d.onnx", ("batch", 3, "h", "w"), np.zeros((1, 6, 1)), imgsz="[96, 96]"), threads=1
    )
    assert dynamic.input_size() == 96 and dynamic.input_size(100) == 128
