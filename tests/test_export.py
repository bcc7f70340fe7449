import cv2
import numpy as np
import onnx
import pytest
import yaml
from onnx import numpy_helper

from yoloslim.evaluate import load_backend, paired_bootstrap_delta, predict_records, split_images
from yoloslim.export.fp16 import convert_fp16
from yoloslim.export.onnx import export_onnx
from yoloslim.export.qdq import calibration_images, check_tensorrt_qdq, head_nodes_kept_in_float, quantize_int8
from yoloslim.runtime.preprocess import preprocess
from yoloslim.utils.errors import YoloslimError


@pytest.fixture(scope="module")
def fp32_onnx(shipped_onnx):
    return shipped_onnx


@pytest.fixture(scope="module")
def int8_onnx(tmp_path_factory, fp32_onnx, synthetic_data):
    """Calibrated on 4 images: enough for the graph's structure, not for its accuracy."""
    return quantize_int8(fp32_onnx, synthetic_data, out=tmp_path_factory.mktemp("int8") / "int8.onnx", count=4)


@pytest.fixture(scope="module")
def fp16_onnx(tmp_path_factory, fp32_onnx):
    return convert_fp16(fp32_onnx, out=tmp_path_factory.mktemp("fp16") / "fp16.onnx")


def val_images(data) -> list:
    return split_images(data, "val")[0]


def _precision_of_each_node(model) -> dict[str, int]:
    """Element type of each node's first output, after shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    return {n.name: types.get(n.output[0]) for n in inferred.graph.node}


def test_onnx_is_opset_17_with_documented_layout(fp32_onnx, synthetic_data):
    model = onnx.load(str(fp32_onnx))
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    classes = len(split_images(synthetic_data, "val")[1])
    assert dims(model.graph.input[0]) == [1, 3, 320, 320]
    assert dims(model.graph.output[0]) == [1, 4 + classes, (40 * 40 + 20 * 20 + 10 * 10)]


def test_onnx_matches_pytorch_on_dataset_images(fp32_onnx, shipped_weights, synthetic_data):
    """The exported graph (with its cheaper DFL form) gives the checkpoint's own raw output: boxes within 0.01 px,
    scores within 1e-4."""
    from yoloslim.runtime.backends import OnnxRuntimeBackend, TorchBackend

    images = [cv2.imread(str(p)) for p in val_images(synthetic_data)[:4]]
    batch, _ = preprocess(images, 320)
    onnx_backend, torch_backend = OnnxRuntimeBackend(str(fp32_onnx), threads=1), TorchBackend(shipped_weights)
    ours, theirs = np.concatenate([onnx_backend(x[None]) for x in batch]), torch_backend(batch)
    np.testing.assert_allclose(ours[:, :4], theirs[:, :4], atol=1e-2)
    np.testing.assert_allclose(ours[:, 4:], theirs[:, 4:], atol=1e-4)


def test_expectation_dfl_equals_ultralytics_dfl():
    import torch
    from ultralytics.nn.modules.block import DFL

    from yoloslim.export.onnx import ExpectationDFL

    dfl = DFL(16)
    x = torch.randn(2, 64, 300) * 4
    torch.testing.assert_close(ExpectationDFL(dfl)(x), dfl(x), atol=1e-5, rtol=1e-5)


def test_qdq_graph_obeys_tensorrt_rules(fp32_onnx, int8_onnx):
    model = onnx.load(str(int8_onnx))
    assert check_tensorrt_qdq(model) == []
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 50 and ops.count("DequantizeLinear") > 100
    # the head's decoding, DFL and final convs stay in float: nothing there reads a dequantized tensor
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    float_head = set(head_nodes_kept_in_float(onnx.load(str(fp32_onnx))))
    assert {"/model.24/Sigmoid", "/model.24/dfl/Softmax", "/model.24/cv2.0/cv2.0.2/Conv"} <= float_head
    for node in model.graph.node:
        if node.name in float_head:
            assert not dequantized & set(node.input), node.name
    assert {p.key: p.value for p in model.metadata_props}["precision"] == "int8"


def test_conv_outputs_stay_float_until_the_next_weighted_layer(int8_onnx):
    """TensorRT's placement: Q/DQ on the inputs of weighted layers only, so no rounding between a conv and its SiLU."""
    model = onnx.load(str(int8_onnx))
    conv_outputs = {n.output[0] for n in model.graph.node if n.op_type == "Conv"}
    quantized_right_after_a_conv = [
        n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in conv_outputs
    ]
    assert quantized_right_after_a_conv == []
    silu_outputs = {n.output[0] for n in model.graph.node if n.op_type == "Mul" and n.name.endswith("/act/Mul")}
    assert any(n.op_type == "QuantizeLinear" and n.input[0] in silu_outputs for n in model.graph.node)


def test_checker_catches_what_tensorrt_refuses(int8_onnx):
    model = onnx.load(str(int8_onnx))
    weight_dq = next(
        n for n in model.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)
    )
    next(a for a in weight_dq.attribute if a.name == "axis").i = 1
    zero = next(
        t
        for t in model.graph.initializer
        if t.name == model.graph.node[[n.op_type for n in model.graph.node].index("QuantizeLinear")].input[2]
    )
    zero.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(zero) + 3, zero.name))
    problems = " ".join(check_tensorrt_qdq(model))
    assert "axis 0" in problems and "zero point must be 0" in problems


@pytest.mark.slow
def test_int8_loses_at_most_one_point_of_map(fp32_onnx, synthetic_val_data, tmp_path):
    """On the whole val split of the embedded dataset; 16 calibration images lose no more than 500 on this model."""
    int8_onnx = quantize_int8(fp32_onnx, synthetic_val_data, out=tmp_path / "int8.onnx", count=16)
    images, names = split_images(synthetic_val_data, "val")
    records = [predict_records(load_backend(p, threads=2), images, 320, progress=False) for p in (fp32_onnx, int8_onnx)]
    delta = paired_bootstrap_delta(*records, num_classes=len(names), samples=300)
    change, low, high = delta["map"]
    assert change > -0.01, f"INT8 lost {-change:.4f} mAP50-95 (95% CI {low:.4f}..{high:.4f})"


def test_quantization_logs_no_preprocessing_advice(fp32_onnx, synthetic_data, tmp_path, caplog):
    """ONNX Runtime advises its pre-processing on every quantize_static call; the placements name the exported graph's
    nodes, which it would rename, so the advice is dropped, and only while quantizing."""
    import logging

    with caplog.at_level(logging.WARNING):
        quantize_int8(fp32_onnx, synthetic_data, out=tmp_path / "int8.onnx", count=2)
        logging.warning("Please consider pre-processing before quantization (a later message)")
    advice = [r.getMessage() for r in caplog.records if "pre-processing before quantization" in r.getMessage()]
    assert advice == ["Please consider pre-processing before quantization (a later message)"]


def test_calibration_never_uses_validation_images(synthetic_data, tmp_path):
    train, val = ({p.resolve() for p in split_images(synthetic_data, split)[0]} for split in ("train", "val"))
    assert {p.resolve() for p in calibration_images(synthetic_data)} == train
    some = {p.resolve() for p in calibration_images(synthetic_data, count=5)}
    assert len(some) == 5 and some < train
    same = tmp_path / "same.yaml"  # coco128's layout: train and val are the same images
    spec = yaml.safe_load(synthetic_data.read_text())
    same.write_text(yaml.safe_dump({**spec, "train": spec["val"]}))
    assert val and not val & train
    with pytest.raises(YoloslimError, match="also in its val split"):
        calibration_images(same)


def test_head_exclusion_spares_inner_convs(fp32_onnx):
    kept = head_nodes_kept_in_float(onnx.load(str(fp32_onnx)))
    assert any("cv2.0.2" in n for n in kept) and any("/dfl/" in n for n in kept)
    assert not any("cv3.1.0" in n or "cv2.2.1" in n for n in kept)


def test_fp16_onnx_is_half_except_head_decoding_and_io(fp32_onnx, fp16_onnx):
    half = onnx.load(str(fp16_onnx))
    precision = _precision_of_each_node(half)
    float_head = set(head_nodes_kept_in_float(onnx.load(str(fp32_onnx))))
    body_convs = [n.name for n in half.graph.node if n.op_type == "Conv" and n.name not in float_head]
    assert len(body_convs) > 50 and all(precision[n] == onnx.TensorProto.FLOAT16 for n in body_convs)
    assert all(precision[n] == onnx.TensorProto.FLOAT for n in float_head)
    assert [v.type.tensor_type.elem_type for v in [*half.graph.input, *half.graph.output]] == [
        onnx.TensorProto.FLOAT
    ] * 2
    resize_scales = {n.input[2] for n in half.graph.node if n.op_type == "Resize"}
    assert resize_scales and all(
        t.data_type == onnx.TensorProto.FLOAT for t in half.graph.initializer if t.name in resize_scales
    )
    assert {p.key: p.value for p in half.metadata_props}["precision"] == "fp16"


def test_fp16_onnx_matches_fp32_on_dataset_images(fp32_onnx, fp16_onnx, synthetic_data):
    full, half = (load_backend(p, threads=2) for p in (fp32_onnx, fp16_onnx))
    batch, _ = preprocess([cv2.imread(str(p)) for p in val_images(synthetic_data)[:4]], 320)
    a, b = (np.concatenate([backend(x[None]) for x in batch]) for backend in (full, half))
    confident = a[:, 4:].max(1) > 0.25
    assert confident.sum() >= 4
    # every class score within 4e-3 (FP16 carries 11 bits; measured up to 2.3e-3), boxes within half a pixel at 320
    assert abs(a[:, 4:] - b[:, 4:]).max() < 4e-3
    assert abs(a[:, :4].transpose(0, 2, 1)[confident] - b[:, :4].transpose(0, 2, 1)[confident]).max() < 0.5


@pytest.mark.slow
def test_fp16_export_from_checkpoint_leaves_only_its_output(shipped_weights, tmp_path):
    from yoloslim.export import ExportConfig, export

    out = export(shipped_weights, ExportConfig(precision="fp16", imgsz=320), out=tmp_path / "m-fp16.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m-fp16.onnx"] == [out.name]
    assert {p.key: p.value for p in onnx.load(str(out)).metadata_props}["precision"] == "fp16"


def test_export_never_overwrites_its_checkpoint(tmp_path):
    from yoloslim.export import ExportConfig, export

    weights = tmp_path / "model.pt"
    weights.write_bytes(b"not read: the output path is refused first")
    for precision in ("fp16", "int8"):
        with pytest.raises(YoloslimError, match="is the input file"):
            export(weights, ExportConfig(precision=precision, imgsz=64), out=weights)
    assert weights.read_bytes() == b"not read: the output path is refused first"


def test_export_config_refuses_batches_outside_the_profile():
    from yoloslim.export import ExportConfig

    with pytest.raises(YoloslimError, match="at least 1"):
        ExportConfig(batch=0)
    with pytest.raises(YoloslimError, match="must not exceed max_batch 8"):
        ExportConfig(format="engine", dynamic=True, batch=16)
    assert ExportConfig(format="engine", dynamic=True, batch=16, max_batch=16).batch == 16


def _conv_with_weight_qdq(axis: int):
    """A one-conv graph whose float weight goes through its own Q/DQ pair (ModelOpt's layout)."""
    from onnx import TensorProto, helper

    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    inits = [
        w,
        numpy_helper.from_array(np.full(4, 0.1, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(4, np.int8), "w_zero"),
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="xq"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="xd"),
        helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zero"], ["wq"], name="wq", axis=axis),
        helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zero"], ["wd"], name="wd", axis=axis),
        helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv"),
    ]
    io = lambda name, c: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, c, 4, 4])  # noqa: E731
    return helper.make_model(helper.make_graph(nodes, "g", [io("x", 3)], [io("y", 4)], inits))


def test_checker_accepts_float_weights_through_a_qdq_pair():
    assert check_tensorrt_qdq(_conv_with_weight_qdq(axis=0)) == []
    assert any("axis 0" in p for p in check_tensorrt_qdq(_conv_with_weight_qdq(axis=1)))


def test_checker_refuses_non_positive_scales():
    model = _conv_with_weight_qdq(axis=0)
    scale = next(t for t in model.graph.initializer if t.name == "w_scale")
    scale.CopyFrom(numpy_helper.from_array(np.array([0.1, 0.0, -0.1, 0.1], np.float32), "w_scale"))
    assert [p for p in check_tensorrt_qdq(model) if "positive" in p] == [
        "wq: scales must be finite and positive",
        "wd: scales must be finite and positive",
    ]


class _RandomImages:
    """A calibration reader feeding a few random inputs."""

    def __init__(self, name, shape, count=4):
        rng = np.random.default_rng(0)
        self.feeds = [{name: rng.random(shape, dtype=np.float32)} for _ in range(count)]
        self.index = 0

    def get_next(self):
        self.index += 1
        return self.feeds[self.index - 1] if self.index <= len(self.feeds) else None

    def rewind(self):
        self.index = 0


def test_convs_reading_small_swings_on_large_offsets_stay_float():
    from onnx import TensorProto, helper

    from yoloslim.export.qdq import convs_with_offset_inputs

    def conv(name, source, out):
        weight = numpy_helper.from_array(np.eye(2, dtype=np.float32).reshape(2, 2, 1, 1), f"{name}_w")
        return helper.make_node("Conv", [source, weight.name], [out], name=name), weight

    # stem reads the image; `offset` reads (image - 0.5) * 0.1 + [20, 0]: one channel a 0.1 swing on 20, the other a
    # 0.1 swing on 0, so the median channel's swing is 0.1 and the peak 20; `plain` reads the stem's output
    nodes, weights = zip(conv("stem", "x", "s"), conv("offset", "shifted", "o"), conv("plain", "s", "p"))
    constants = [
        numpy_helper.from_array(np.array(v, dtype=np.float32).reshape(shape), n)
        for n, v, shape in (("half", 0.5, ()), ("tenth", 0.1, ()), ("lift", [20.0, 0.0], (1, 2, 1, 1)))
    ]
    prep = [
        helper.make_node("Sub", ["x", "half"], ["c"]),
        helper.make_node("Mul", ["c", "tenth"], ["m"]),
        helper.make_node("Add", ["m", "lift"], ["shifted"]),
    ]
    graph = helper.make_graph(
        prep + list(nodes),
        "offsets",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("o", "p")],
        initializer=list(weights) + constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert convs_with_offset_inputs(model, _RandomImages("x", (1, 2, 8, 8)), skip=set()) == ["offset"]


@pytest.mark.slow
def test_sparse_models_offset_inputs_stay_float_in_the_qdq_graph(shipped_sparse_weights, synthetic_data, tmp_path):
    """The shipped sparse model's model.6 convs read small swings on large offsets: no Q/DQ on them."""
    fp32 = export_onnx(shipped_sparse_weights, imgsz=160, out=tmp_path / "sparse.onnx")
    quantized = onnx.load(str(quantize_int8(fp32, synthetic_data, count=8)))
    dequantized = {n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    conv_inputs = {n.name: n.input[0] for n in quantized.graph.node if n.op_type == "Conv"}
    assert conv_inputs["/model.6/cv1/conv/Conv"] not in dequantized
    assert conv_inputs["/model.2/cv1/conv/Conv"] in dequantized


def tiny_checkpoint(path, channels: int = 3, **train_args):
    """A YOLOv8n of two classes as Ultralytics saves it, with these train_args (imgsz, data) changed."""
    import torch
    from test_prune import save_as_ultralytics_would
    from ultralytics.nn.tasks import DetectionModel

    save_as_ultralytics_would(DetectionModel("yolov8n.yaml", ch=channels, nc=2, verbose=False).eval(), path)
    ckpt = torch.load(path, weights_only=False)
    ckpt["train_args"].update(train_args)
    torch.save(ckpt, path)
    return path


def _input_dims(path) -> list:
    return [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]


def test_export_runs_at_the_trained_size_and_refuses_what_its_layout_cannot_hold(tmp_path):
    weights = tiny_checkpoint(tmp_path / "m.pt", imgsz=96)
    assert _input_dims(export_onnx(weights, out=tmp_path / "m.onnx")) == [1, 3, 96, 96]  # as Ultralytics' export
    for imgsz in (0, 80):
        with pytest.raises(YoloslimError, match=f"multiple of this model's largest stride 32, got {imgsz}"):
            export_onnx(weights, imgsz=imgsz, out=tmp_path / "x.onnx")
    gray = tiny_checkpoint(tmp_path / "gray.pt", channels=1)
    with pytest.raises(YoloslimError, match="takes 1-channel images; yoloslim exports and runs RGB"):
        export_onnx(gray, imgsz=64, out=tmp_path / "x.onnx")
    (tmp_path / "folder").mkdir()
    with pytest.raises(YoloslimError, match="is a folder; pass a file path, such as"):
        export_onnx(weights, imgsz=64, out=tmp_path / "folder")
    junk = tmp_path / "junk.pt"
    junk.write_text("garbage\n")
    with pytest.raises(YoloslimError, match="junk.pt is not a loadable"):
        export_onnx(junk, imgsz=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "gray.pt", "junk.pt", "m.onnx", "m.pt"]


def test_int8_calibrates_on_the_training_data_in_batches_of_a_static_export(synthetic_data, tmp_path):
    from yoloslim.export import ExportConfig, export
    from yoloslim.runtime.backends import OnnxRuntimeBackend

    config = ExportConfig(precision="int8", imgsz=64, batch=2, calibration_images=4)
    moved = tiny_checkpoint(tmp_path / "moved.pt", data=str(tmp_path / "gone" / "data.yaml"))
    with pytest.raises(YoloslimError, match=r"needs this model's training images and .*gone/data.yaml is not here"):
        export(moved, config)
    weights = tiny_checkpoint(tmp_path / "m.pt", data=str(synthetic_data))
    int8 = export(weights, config)
    assert _input_dims(int8) == [2, 3, 64, 64]
    image = cv2.imread(str(val_images(synthetic_data)[0]))
    assert OnnxRuntimeBackend(int8, threads=1)(preprocess([image], 64)[0]).shape == (1, 6, 84)
