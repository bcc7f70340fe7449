"""The CPU flavour of INT8 (`yoloslim export --precision int8 --target cpu`): what ONNX Runtime's graph optimizer makes
of it, what stays in float, and the refusals."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_cli import assert_one_line_error
from test_export import _RandomImages

from yoloslim.export import ExportConfig, export
from yoloslim.export.onnx import export_onnx
from yoloslim.export.qdq import (
    check_tensorrt_qdq,
    correct_biases,
    head_nodes_kept_in_float,
    quantize_int8,
    tensors_with_offsets,
)
from yoloslim.utils.errors import YoloslimError


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The shipped baseline at 160 px: its FP32 ONNX and both INT8 flavours, calibrated on 8 training images."""
    from yoloslim.data import resolve_data
    from yoloslim.utils.assets import BASELINE, shipped_file

    work = tmp_path_factory.mktemp("int8")
    fp32 = export_onnx(shipped_file("weights", BASELINE), imgsz=160, out=work / "fp32.onnx")
    data = resolve_data(None)
    flavours = {t: quantize_int8(fp32, data, out=work / f"{t}.onnx", count=8, target=t) for t in ("tensorrt", "cpu")}
    return {"fp32": fp32, **flavours}


def optimized_graph(path, tmp_path):
    """The graph ONNX Runtime's CPU provider runs: the session's optimized model, saved and loaded back."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def quantized_convs(model) -> set[str]:
    """Convolutions of a Q/DQ graph whose weights come through a DequantizeLinear."""
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in dequantized}


def fused_convs(qdq, optimized) -> set[str]:
    """Convolutions of the Q/DQ graph that ONNX Runtime turned into QLinearConv (named after them)."""
    fused = [n.name for n in optimized.graph.node if n.op_type == "QLinearConv"]
    convs = [n.name for n in qdq.graph.node if n.op_type == "Conv"]
    return {c for c in convs if any(f == c or f.startswith(c + "_token") for f in fused)}


@pytest.mark.slow
def test_onnx_runtime_fuses_the_cpu_flavour_into_quantized_kernels(baseline, tmp_path):
    qdq = onnx.load(str(baseline["cpu"]))
    optimized = optimized_graph(baseline["cpu"], tmp_path)
    ops = {n.op_type for n in optimized.graph.node}
    assert quantized_convs(qdq) and fused_convs(qdq, optimized) == quantized_convs(qdq)
    assert {"QLinearSigmoid", "QLinearMul", "QLinearConcat", "QLinearAdd"} <= ops  # SiLU and the joins in int8 too
    # the TensorRT flavour gives ONNX Runtime nothing to fuse: its int8 activations have no zero point to take
    tensorrt = onnx.load(str(baseline["tensorrt"]))
    assert not fused_convs(tensorrt, optimized_graph(baseline["tensorrt"], tmp_path))


@pytest.mark.slow
def test_cpu_flavour_keeps_the_head_and_the_stem_in_float(baseline):
    fp32, qdq = onnx.load(str(baseline["fp32"])), onnx.load(str(baseline["cpu"]))
    head = set(head_nodes_kept_in_float(fp32))
    stem = {n.name for n in fp32.graph.node if n.op_type == "Conv" and n.input[0] == "images"}
    assert stem and {n.name for n in fp32.graph.node if n.op_type == "Conv"} & head
    assert not quantized_convs(qdq) & (head | stem)
    head_outputs = {o for n in qdq.graph.node if n.name in head for o in n.output}
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in head_outputs for n in qdq.graph.node)


@pytest.mark.slow
def test_cpu_flavour_weights_fit_seven_bits(baseline):
    """uint8 x int8 kernels without VNNI add two products in int16: 255 * 64 * 2 fits, 255 * 127 * 2 does not."""
    qdq = onnx.load(str(baseline["cpu"]))
    weights = [numpy_helper.to_array(t) for t in qdq.graph.initializer if t.data_type == TensorProto.INT8]
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) > 32  # 7 bits used, not fewer


@pytest.mark.slow
def test_flavour_is_in_the_metadata_and_tensorrt_flavour_still_passes_its_checker(baseline):
    for target in ("tensorrt", "cpu"):
        meta = {p.key: p.value for p in onnx.load(str(baseline[target])).metadata_props}
        assert meta["int8_target"] == target and meta["precision"] == "int8" and "names" in meta
    assert check_tensorrt_qdq(onnx.load(str(baseline["tensorrt"]))) == []
    assert check_tensorrt_qdq(onnx.load(str(baseline["cpu"])))  # zero points, int32 biases: not TensorRT's


@pytest.mark.slow
def test_cpu_flavour_loses_at_most_one_point_of_map(tmp_path):
    """On the embedded dataset's validation split at 320 px, calibrated on 100 training images."""
    from yoloslim.data import resolve_data
    from yoloslim.evaluate import load_backend, paired_bootstrap_delta, predict_records, split_images
    from yoloslim.utils.assets import BASELINE, shipped_file

    data = resolve_data(None)
    fp32 = export_onnx(shipped_file("weights", BASELINE), imgsz=320, out=tmp_path / "fp32.onnx")
    cpu = quantize_int8(fp32, data, count=100, target="cpu")
    images, names = split_images(data, "val")
    records = [predict_records(load_backend(p, threads=2), images, 320, progress=False) for p in (fp32, cpu)]
    change = paired_bootstrap_delta(*records, num_classes=len(names), samples=200)["map"][0]
    assert change >= -0.01


@pytest.mark.slow
def test_sparse_models_offset_tensors_stay_float_in_the_cpu_flavour(tmp_path):
    """The shipped sparse model's model.6 inputs carry small swings on large offsets: neither Q/DQ
    on them nor a fused kernel reading them, while model.2 runs in int8."""
    from yoloslim.data import resolve_data
    from yoloslim.utils.assets import shipped_file

    fp32 = export_onnx(shipped_file("weights", "yolov5n-synthetic-sparse.pt"), imgsz=160, out=tmp_path / "sparse.onnx")
    path = quantize_int8(fp32, resolve_data(None), count=8, target="cpu")
    qdq = onnx.load(str(path))
    fused = fused_convs(qdq, optimized_graph(path, tmp_path))
    dequantized = {n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    conv_inputs = {n.name: n.input[0] for n in qdq.graph.node if n.op_type == "Conv"}
    assert conv_inputs["/model.6/cv1/conv/Conv"] not in dequantized and "/model.6/cv1/conv/Conv" not in fused
    assert "/model.2/cv1/conv/Conv" in fused


def _conv(name, source, out, weight, bias):
    w = numpy_helper.from_array(np.asarray(weight, np.float32), f"{name}_w")
    b = numpy_helper.from_array(np.asarray(bias, np.float32), f"{name}_b")
    return helper.make_node("Conv", [source, w.name, b.name], [out], name=name), [w, b]


def _graph(nodes_and_weights, outputs):
    nodes = [n for n, _ in nodes_and_weights]
    weights = [w for _, pair in nodes_and_weights for w in pair]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


ZERO = np.zeros((2, 2, 1, 1))


def test_constant_carriers_stay_float():
    """A tensor whose channels are each constant, at different values, cannot be held exactly by one scale; one value
    everywhere can, and so can a live tensor."""
    model = _graph(
        [
            _conv("live", "x", "a", np.eye(2).reshape(2, 2, 1, 1), [0.0, 0.0]),
            _conv("carrier", "x", "c", ZERO, [1.3, -0.45]),
            _conv("uniform", "x", "u", ZERO, [0.7, 0.7]),
        ],
        ["a", "c", "u"],
    )
    assert tensors_with_offsets(model, _RandomImages("x", (1, 2, 8, 8)), skip=set()) == ["c"]


def test_bias_correction_takes_away_the_mean_shift_of_rounding(tmp_path):
    """A constant carrier concatenated to live channels and rounded on the way into a convolution shifts its output's
    mean; correct_biases takes that shift out of the int32 bias."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from yoloslim.export.qdq import channel_means

    weight = np.random.default_rng(1).normal(size=(3, 4, 1, 1))
    # c = x * 0 + [1.3, -0.45] per channel, in float (Mul and Add are not quantized here)
    zero, bias = (
        numpy_helper.from_array(np.asarray(v, np.float32).reshape(1, 2, 1, 1), n)
        for n, v in (("zero", [0, 0]), ("carried", [1.3, -0.45]))
    )
    carrier = [
        (helper.make_node("Mul", ["x", "zero"], ["z"], name="zeroed"), [zero]),
        (helper.make_node("Add", ["z", "carried"], ["c"], name="carrier"), [bias]),
    ]
    concat = helper.make_node("Concat", ["x", "c"], ["cat"], name="cat", axis=1)
    model = _graph([*carrier, (concat, []), _conv("mix", "cat", "y", weight, [0.0, 0.0, 0.0])], ["y"])
    onnx.save(model, str(tmp_path / "float.onnx"))
    reader = _RandomImages("x", (1, 2, 8, 8), count=8)
    quantize_static(
        str(tmp_path / "float.onnx"),
        str(tmp_path / "int8.onnx"),
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "Concat"],
        per_channel=True,
        reduce_range=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    quantized = onnx.load(str(tmp_path / "int8.onnx"))
    reference = channel_means(model, reader, ["y"])["y"]
    before = np.abs(channel_means(quantized, reader, ["y"])["y"] - reference).max()
    assert correct_biases(quantized, model, reader) == 1
    after = np.abs(channel_means(quantized, reader, ["y"])["y"] - reference).max()
    assert before > 1e-3 and after < before / 10


def test_export_config_refuses_unknown_and_misplaced_targets():
    with pytest.raises(YoloslimError, match="unknown target 'arm'"):
        ExportConfig(precision="int8", target="arm")
    with pytest.raises(YoloslimError, match="INT8 flavour"):
        ExportConfig(precision="fp16", target="cpu")
    with pytest.raises(YoloslimError, match="target tensorrt"):
        ExportConfig(format="engine", precision="int8", target="cpu")
    assert ExportConfig().target == "tensorrt"


def test_quantize_int8_refuses_an_unknown_target(tmp_path):
    with pytest.raises(YoloslimError, match="use tensorrt or cpu"):
        quantize_int8(tmp_path / "model.onnx", tmp_path / "data.yaml", target="gpu")


def _cpu_flavoured_onnx(path):
    """A stand-in file: what matters to the engine builder is the flavour in the metadata."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["output0"])],
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 3, 32, 32])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="int8_target", value="cpu")
    onnx.save(model, str(path))
    return path


def test_engines_are_not_built_from_the_cpu_flavour(cli, tmp_path):
    onnx_path = _cpu_flavoured_onnx(tmp_path / "model-int8.onnx")
    with pytest.raises(YoloslimError, match="CPU flavour"):
        export(onnx_path, ExportConfig(format="engine", precision="int8"))
    assert_one_line_error(
        cli("export", "--weights", str(onnx_path), "--format", "engine", "--precision", "int8"),
        "CPU flavour",
        "--target tensorrt",
    )


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--precision", "int8", "--target", "arm"], ["unknown target 'arm'", "tensorrt or cpu"]),
        (["--precision", "fp16", "--target", "cpu"], ["INT8 flavour", "precision int8"]),
    ],
)
def test_cli_refuses_bad_targets_in_one_line(cli, tmp_path, flags, words):
    assert_one_line_error(cli("export", "--weights", str(tmp_path / "missing.pt"), *flags), *words)


def test_the_two_int8_flavours_are_written_to_different_files(tmp_path):
    import shutil

    from yoloslim.data import resolve_data
    from yoloslim.export import ExportConfig, export
    from yoloslim.utils.assets import BASELINE, shipped_file

    weights = Path(shutil.copy(shipped_file("weights", BASELINE), tmp_path / "best.pt"))
    written = {
        target: export(
            weights,
            ExportConfig(precision="int8", target=target, imgsz=64, calibration_images=2),
            data=resolve_data(None),
        )
        for target in ("tensorrt", "cpu")
    }
    assert {p.name for p in written.values()} == {"best-int8.onnx", "best-int8-cpu.onnx"}
    assert all(p.is_file() for p in written.values())
