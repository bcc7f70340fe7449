"""Deploying and evaluating the original YOLOv5 repository's anchor-based checkpoints: ONNX, FP16 and INT8 export, the
runtime and `yoloslim eval`, against the original's own outputs, detections and val.py metrics recorded in the
committed fixtures by tools/make_classic_fixtures.py (docs/classic-yolov5.md)."""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from yoloslim.evaluate import evaluate
from yoloslim.export.classic import export_classic_onnx
from yoloslim.export.fp16 import convert_fp16
from yoloslim.export.onnx import export_onnx
from yoloslim.export.qdq import check_tensorrt_qdq, head_nodes_kept_in_float, quantize_int8
from yoloslim.models import load_classic_checkpoint
from yoloslim.runtime.backends import OnnxRuntimeBackend, TorchBackend, load_backend
from yoloslim.runtime.onnx_meta import ANCHOR_HEAD, head_kind, read_onnx_metadata
from yoloslim.runtime.postprocess import default_iou, objectness_scores, postprocess
from yoloslim.runtime.preprocess import preprocess

FIXTURES = Path(__file__).parent / "fixtures" / "classic"
VAL = FIXTURES / "val"  # generated images, a model v7.0's train.py trained, and what v7.0's val.py and NMS made of it
VAL_IMGSZ = 128


@pytest.fixture(scope="module")
def inputs():
    with np.load(FIXTURES / "inputs.npz") as loaded:
        return {name: loaded[name].astype(np.float32) / 255 for name in loaded.files}


@pytest.fixture(scope="module")
def classic_onnx(tmp_path_factory):
    """v7.0-best.pt (yolov5n.yaml at width 1/32) exported at 64 px, static batch 1."""
    folder = tmp_path_factory.mktemp("classic")
    weights = shutil.copy(FIXTURES / "v7.0-best.pt", folder)
    return export_onnx(weights, imgsz=64)


@pytest.fixture(scope="module")
def val_onnx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("val")
    return export_onnx(shutil.copy(VAL / "v7.0-val.pt", folder), imgsz=VAL_IMGSZ)


def eval_output(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x))[0].numpy()


def onnx_output(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]


def assert_close_to_scale(found: np.ndarray, want: np.ndarray) -> None:
    """Within 1e-5 of the output's largest value (boxes reach hundreds of pixels) and 1e-4 relative."""
    assert found.shape == want.shape
    np.testing.assert_allclose(found, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_onnx_output_is_the_models_eval_output(classic_onnx, inputs):
    model, _ = load_classic_checkpoint(FIXTURES / "v7.0-best.pt")
    x = inputs["image0"]
    assert_close_to_scale(onnx_output(classic_onnx, x), eval_output(model, x))
    graph = onnx.load(str(classic_onnx))
    assert {o.domain: o.version for o in graph.opset_import}[""] == 17
    assert [i.name for i in graph.graph.input] == ["images"] and [o.name for o in graph.graph.output] == ["output0"]


@pytest.mark.slow
def test_dynamic_onnx_takes_other_batches_and_sizes(tmp_path, inputs):
    model, _ = load_classic_checkpoint(FIXTURES / "v7.0-best.pt")
    path = export_classic_onnx(model, tmp_path / "dynamic.onnx", imgsz=64, batch=1, dynamic=True, opset=17)
    x = inputs["image1"]  # a batch of two 32x64 images
    assert_close_to_scale(onnx_output(path, x), eval_output(model, x))


def test_metadata_says_anchor_head_and_what_the_original_reads(classic_onnx):
    model, _ = load_classic_checkpoint(FIXTURES / "v7.0-best.pt")
    meta = read_onnx_metadata(classic_onnx)
    assert head_kind(meta) == meta["head"] == ANCHOR_HEAD
    assert meta["names"] == model.names and meta["stride"] == int(model.stride.max()) and meta["imgsz"] == [64, 64]


@pytest.mark.parametrize(
    ("meta", "head"),
    [
        ({"head": "anchor"}, "anchor"),
        ({"end2end": "True"}, "end-to-end"),
        ({"end2end": "False"}, "anchor-free"),
        ({}, "anchor-free"),  # an Ultralytics export from before the head key
    ],
)
def test_head_kind_reads_the_key_or_infers_it(meta, head):
    assert head_kind(meta) == head


def test_objectness_multiplies_the_class_scores():
    rows = np.array([[[10, 20, 4, 6, 0.5, 0.2, 0.9]]], dtype=np.float32)  # (batch 1, 1 anchor, 5 + 2 classes)
    np.testing.assert_allclose(objectness_scores(rows)[0, :, 0], [10, 20, 4, 6, 0.1, 0.45])


def head_output_convs(model) -> list:
    return [n for n in model.graph.node if n.op_type == "Conv" and n.name in set(head_nodes_kept_in_float(model))]


def assert_head_output_convs_in_float(path: Path, n_levels: int) -> None:
    """The Detect's output convolutions read float32 activations (not dequantized ones) and float32 weights and
    biases, and write float32."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    producer = {o: n for n in model.graph.node for o in n.output}
    weights = {t.name: t for t in model.graph.initializer}
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    convs = head_output_convs(model)
    assert [c.name for c in convs] == [f"/model.24/m.{i}/Conv" for i in range(n_levels)]
    for conv in convs:
        assert producer[conv.input[0]].op_type != "DequantizeLinear", conv.name
        assert types[conv.input[0]] == types[conv.output[0]] == onnx.TensorProto.FLOAT, conv.name
        assert all(weights[name].data_type == onnx.TensorProto.FLOAT for name in conv.input[1:]), conv.name


def test_fp16_export_keeps_the_head_in_float(classic_onnx, tmp_path, inputs):
    half = convert_fp16(classic_onnx, out=tmp_path / "fp16.onnx")
    assert_head_output_convs_in_float(half, n_levels=3)
    body = [n for n in onnx.load(str(half)).graph.node if n.op_type == "Conv" and not n.name.startswith("/model.24/")]
    assert len(body) > 50 and all(n.input[1].endswith("_fp16") for n in body)  # float16 weights
    meta = read_onnx_metadata(half)
    assert meta["precision"] == "fp16" and head_kind(meta) == ANCHOR_HEAD
    full, reduced = (onnx_output(p, inputs["image0"]) for p in (classic_onnx, half))
    assert np.abs(full[..., 4:] - reduced[..., 4:]).max() < 4e-3  # objectness and class scores


@pytest.mark.parametrize("target", ["tensorrt", "cpu"])
def test_int8_export_passes_the_checker_and_keeps_the_head_in_float(classic_onnx, tiny_data, tmp_path, target):
    path = quantize_int8(classic_onnx, tiny_data, out=tmp_path / "int8.onnx", count=4, target=target)
    model = onnx.load(str(path))
    if target == "tensorrt":
        assert check_tensorrt_qdq(model) == []
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) > 10  # the body is quantized
    assert_head_output_convs_in_float(path, n_levels=3)
    meta = read_onnx_metadata(path)
    assert (meta["precision"], meta["int8_target"], head_kind(meta)) == ("int8", target, ANCHOR_HEAD)


# ---- the runtime and eval against the original's own NMS and val.py (tests/fixtures/classic/val) -------------------


def val_images() -> list:
    return sorted((VAL / "images").glob("*.jpg"))


def recorded_detections(kind: str) -> dict:
    """The original pipeline's detections per image stem (x1, y1, x2, y2, confidence, class), `detect` or `val`."""
    with np.load(VAL / "nms.npz") as loaded:
        return {key.split("_", 1)[1]: loaded[key] for key in loaded.files if key.startswith(f"{kind}_")}


def runtime_detections(backend, image: Path, **settings) -> np.ndarray:
    batch, boxes = preprocess([cv2.imread(str(image))], backend.input_size(VAL_IMGSZ))
    det = postprocess(backend(batch), boxes, end_to_end=backend.end_to_end, **settings)[0]
    return np.concatenate([det.boxes, det.scores[:, None], det.classes[:, None]], axis=1)


def assert_same_detections(found: np.ndarray, want: np.ndarray, message: str) -> None:
    """The same detections, in any order: each row of either has a row of the other with every value (box, confidence,
    class) within 2e-3. The original fuses each convolution with its BatchNorm, which moves the last digits."""
    close = np.abs(want[:, None, :] - found[None, :, :]).max(axis=2) < 2e-3
    assert len(found) == len(want) and close.any(axis=1).all() and close.any(axis=0).all(), message


def above_the_cut(rows: np.ndarray, lowest: float) -> np.ndarray:
    """Rows clearly above `lowest`, the confidence where max_det cut the list (ties there may fall either way)."""
    return rows[rows[:, 4] > lowest + 1e-3]


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test, as ONNX Runtime's backends here (restored afterwards)."""
    threads = torch.get_num_threads()
    yield 1
    torch.set_num_threads(threads)


@pytest.mark.parametrize("weights", ["pt", "onnx"])
def test_detect_settings_give_the_originals_detections(weights, val_onnx, one_torch_thread):
    path = VAL / "v7.0-val.pt" if weights == "pt" else val_onnx
    backend = TorchBackend(path, one_torch_thread) if weights == "pt" else OnnxRuntimeBackend(str(path), 1)
    assert backend.head == ANCHOR_HEAD and default_iou(backend.head, "detect") == 0.45
    recorded = recorded_detections("detect")
    assert len(recorded) == len(val_images()) and sum(map(len, recorded.values())) >= 5  # the model detects
    for image in val_images():
        found = runtime_detections(backend, image, conf=0.25, iou=default_iou(backend.head, "detect"), max_det=1000)
        assert_same_detections(found, recorded[image.stem], image.name)


def test_eval_settings_give_the_originals_detections(val_onnx):
    backend = OnnxRuntimeBackend(str(val_onnx))
    iou = default_iou(backend.head, "eval")
    assert iou == 0.6
    for stem, want in recorded_detections("val").items():
        found = runtime_detections(backend, VAL / "images" / f"{stem}.jpg", conf=0.001, iou=iou, multi_label=True)
        assert len(want) > 20 and len(found) == len(want), stem
        lowest = want[:, 4].min()
        assert_same_detections(above_the_cut(found, lowest), above_the_cut(want, lowest), stem)


@pytest.mark.parametrize("weights", ["pt", "onnx"])
def test_eval_agrees_with_the_originals_val_py(weights, val_onnx, one_torch_thread):
    """Within 0.01 of val.py with its defaults, and of val.py run on square letterboxed images, the input yoloslim
    feeds (its defaults letterbox each batch one stride wider: docs/classic-yolov5.md)."""
    expected = json.loads((VAL / "val.json").read_text())
    assert expected["val.py"]["iou_thres"] == 0.6 and expected["map50"] > 0.5  # a model that detects
    path = VAL / "v7.0-val.pt" if weights == "pt" else val_onnx
    result = evaluate(path, VAL / "data.yaml", imgsz=VAL_IMGSZ, bootstrap=0, threads=one_torch_thread)
    for prefix in ("", "square_"):
        assert abs(result.map - expected[f"{prefix}map"]) <= 0.01, prefix
        assert abs(result.map50 - expected[f"{prefix}map50"]) <= 0.01, prefix


def test_bench_times_and_counts_a_classic_checkpoint(val_onnx, one_torch_thread):
    from yoloslim.bench import bench

    models = [VAL / "v7.0-val.pt", val_onnx]
    report = bench(models, imgsz=VAL_IMGSZ, threads=one_torch_thread, image=val_images()[0], rounds=1)
    pt, onnx_row = report["results"]
    assert pt["params"] == sum(p.numel() for p in load_classic_checkpoint(VAL / "v7.0-val.pt")[0].parameters())
    assert pt["gflops"] > 0 and onnx_row["backend"] == "OnnxRuntimeBackend" and onnx_row["params"] > 0


def test_detect_command_writes_the_originals_detections(cli, val_onnx, tmp_path):
    code, err, _ = cli("detect", "--weights", val_onnx, "--source", VAL / "images", "--project", tmp_path)
    assert code == 0, err
    labels = tmp_path / "predict" / "labels"
    recorded = recorded_detections("detect")
    assert {p.stem: len(p.read_text().splitlines()) for p in labels.iterdir()} == {
        stem: len(rows) for stem, rows in recorded.items()
    }


@pytest.mark.slow
def test_int8_export_command_takes_a_classic_checkpoint(cli, tiny_data, tmp_path):
    weights = shutil.copy(FIXTURES / "v7.0-best.pt", tmp_path)
    out = tmp_path / "int8.onnx"
    argv = ["export", "--weights", weights, "--imgsz", "64", "--precision", "int8", "--data", tiny_data, "--out", out]
    code, err, _ = cli(*argv)
    assert code == 0, err
    meta = read_onnx_metadata(out)
    assert (meta["precision"], head_kind(meta)) == ("int8", ANCHOR_HEAD)


# ---- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["export", "--weights", "{ghost}"], ["models.common.GhostConv"]),
        (["export", "--weights", "{segment}", "--precision", "fp16"], ["segmentation checkpoint"]),
        (["eval", "--weights", "{segment}", "--data", "{data}"], ["segmentation checkpoint"]),
        (["bench", "--weights", "{ghost}", "--source", "{image}"], ["models.common.GhostConv"]),
        (["export", "--weights", "{truncated}"], ["truncated"]),
        (["export", "--weights", "{best}", "--target", "cpu"], ["target cpu"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(cli, tmp_path, argv, words):
    files = {"ghost": "v7.0-ghost.pt", "segment": "v7.0-segment.pt", "best": "v7.0-best.pt"}
    paths = {key: Path(shutil.copy(FIXTURES / name, tmp_path)) for key, name in files.items()}
    paths.update(data=VAL / "data.yaml", image=val_images()[0], truncated=tmp_path / "truncated.pt")
    data = (FIXTURES / "v7.0-best.pt").read_bytes()
    paths["truncated"].write_bytes(data[: len(data) // 2])
    before = sorted(tmp_path.iterdir())
    code, err, _ = cli(*[a.format(**paths) for a in argv])
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(word in err for word in words), err
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    ("name", "names"),
    [("v7.0-best", {0: "circle", 1: "square", 2: "triangle"}), ("v6.0-best", {0: "0", 1: "1", 2: "2"})],  # a list
)
def test_load_backend_reads_classic_checkpoints_and_their_names(name, names, tmp_path):
    backend = load_backend(FIXTURES / f"{name}.pt")
    assert backend.head == ANCHOR_HEAD and backend.names == names
    model, _ = load_classic_checkpoint(FIXTURES / f"{name}.pt")
    out = export_classic_onnx(model, tmp_path / "m.onnx", imgsz=64, batch=1, dynamic=False, opset=17)
    assert read_onnx_metadata(out)["names"] == names == OnnxRuntimeBackend(str(out)).names
