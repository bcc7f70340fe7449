"""INT8 by explicit quantization: a Q/DQ ONNX calibrated on the host, that TensorRT 8.5 to 11 builds as is.

Why explicit: TensorRT 11 removed the implicit INT8 calibrator; a Q/DQ graph works on every version and its
accuracy can be measured with ONNX Runtime before any device sees it.

What TensorRT accepts, and what this writes (check_tensorrt_qdq lists any deviation):
- int8 Q/DQ only, zero points 0 (symmetric), no int32 bias Q/DQ (TensorRT quantizes biases itself);
- per-tensor scales for activations, per-channel scales on axis 0 (output channels) for conv weights.

Calibration uses exactly the inference preprocessing (yoloslim.runtime.preprocess.letterbox; a different resize or
padding at calibration is a known cause of INT8 accuracy loss) on up to 500 training-split images (all of them when
fewer), never on images of the split used for mAP. The numerically sensitive head stays in float: the final box and
class convolutions, the DFL, the box decoding and the final sigmoid; so does any convolution whose input carries its
signal as small swings on large offsets (convs_with_offset_inputs), as sparsity-trained models' inputs do.

Two flavours of the same model (`target`), recorded in the ONNX metadata as `int8_target`:
- "tensorrt" (the default): the rules above, Q/DQ on the inputs of the convolutions only, TensorRT's placement.
- "cpu": Q/DQ placed so that ONNX Runtime's CPU execution provider fuses it into quantized kernels: uint8 activations
  with zero points (on x86 ONNX Runtime fuses int8 activations only when a session option allows it), int8
  per-channel weights on 7 bits (the uint8 x int8 kernels of AVX2 and AVX-512 CPUs without VNNI add pairs of products
  in int16, which 8-bit weights overflow), and Q/DQ around every convolution, SiLU (Sigmoid, Mul), residual Add,
  Concat, MaxPool and Resize, so that QLinearConv, QLinearSigmoid, QLinearMul, QLinearAdd and QLinearConcat hand int8
  tensors to one another. The head and the first convolution (3 input channels: ONNX Runtime's int8 kernel ran it
  slower than float) stay in float, and so does every tensor that fails the offset check (tensors_with_offsets), with
  its producer and its consumers. Each quantized convolution's bias then absorbs the mean shift that quantization
  leaves in its output (correct_biases).
"""

from __future__ import annotations

import logging
import random
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.files import atomic_path, output_path

CALIBRATION_IMAGES = 500
OFFSET_PROBE_IMAGES = 32
# A conv input whose largest value exceeds this many times its median channel's swing keeps the conv in float (see
# convs_with_offset_inputs). At 5 the shipped baseline and the license-plate model (docs/deployment.md) keep every conv
# in INT8 and the shipped sparse model keeps 17 in float (INT8 0.364 -> 0.590 against 0.610 FP32); 3 would also take 7
# of the license-plate model's.
OFFSET_LIMIT = 5.0
# The channel whose swing the largest value is judged against: the median one. The 75th or 90th percentile quantizes
# more of a real prune on a CPU, but the six-class sparse model's prune then lost 10.4-11.0 points in the TensorRT
# flavour and 2.3-2.5 in the CPU flavour, against 2.0 and 1.0 with the median (docs/deployment.md).
OFFSET_SWING_PERCENTILE = 50
TARGETS = ("tensorrt", "cpu")
INT8_TARGET_KEY = "int8_target"  # ONNX metadata: which flavour a Q/DQ file is (the engine builder refuses "cpu")
# What ONNX Runtime's CPU provider runs on int8 tensors of a QDQ graph: QLinearConv, QLinearSigmoid and QLinearMul
# (SiLU), QLinearAdd, QLinearConcat, and MaxPool and Resize on the int8 values themselves.
CPU_OP_TYPES = ["Conv", "Sigmoid", "Mul", "Add", "Concat", "MaxPool", "Resize"]
# the head's inner conv blocks (an end-to-end head's one-to-one branch's too), quantized like the body
_HEAD_INNER = re.compile(r"/(?:one2one_)?cv[23]\.\d+/(?:one2one_)?cv[23]\.\d+\.[01]/")


def head_nodes_kept_in_float(model) -> list[str]:
    """Nodes of the Detect head except its inner conv blocks: final convs, DFL, decoding, sigmoid."""
    indices = [int(m.group(1)) for n in model.graph.node if (m := re.match(r"/model\.(\d+)/", n.name))]
    if not indices:
        raise YoloslimError("this ONNX has no Ultralytics layer names (/model.N/...); export it with yoloslim export")
    head = f"/model.{max(indices)}/"
    return [n.name for n in model.graph.node if n.name.startswith(head) and not _HEAD_INNER.search(n.name)]


def convs_with_offset_inputs(
    model, reader: LetterboxCalibrationReader, skip: set[str], limit: float = OFFSET_LIMIT
) -> list[str]:
    """Convolutions whose input carries its signal as small swings on large offsets, which one symmetric INT8 scale per
    tensor (all TensorRT takes) flattens: the input's largest magnitude over its median channel's swing (max - min over
    the probe images) exceeds `limit`. Sparsity training leaves such inputs (it shrinks gamma, not beta); constant
    channels are left out of the median, and an input that is constant throughout quantizes exactly."""
    inputs = {i.name for i in model.graph.input}  # the image itself is not an activation
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name not in skip and n.input[0] not in inputs]
    ranges = channel_ranges(model, reader, list(dict.fromkeys(n.input[0] for n in convs)))
    return [n.name for n in convs if _carries_offsets(*ranges[n.input[0]], limit)]


def tensors_with_offsets(
    model, reader: LetterboxCalibrationReader, skip: set[str], limit: float = OFFSET_LIMIT
) -> list[str]:
    """The CPU flavour's offset check, on every activation it would quantize (those that CPU_OP_TYPES nodes outside
    `skip` read or write): the same test as convs_with_offset_inputs, and also constant carriers, tensors whose every
    channel is constant but not all at one value (pruning keeps such channels to carry a removed channel's bias): one
    scale rounds each constant differently, and the shift reaches every later layer. A SiLU's input and its sigmoid
    are judged by the SiLU's output, the values the next layers read."""
    constants = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    nodes = [n for n in model.graph.node if n.op_type in CPU_OP_TYPES and n.name not in skip]
    tensors = list(dict.fromkeys(t for n in nodes for t in (*n.input, *n.output) if t and t not in constants))
    silu = silu_outputs(model)
    judged = {t: silu.get(t, t) for t in tensors}
    ranges = channel_ranges(model, reader, list(dict.fromkeys(judged.values())))
    flagged = {t for t, (lo, hi) in ranges.items() if _carries_offsets(lo, hi, limit) or _carries_constants(lo, hi)}
    return [t for t in tensors if judged[t] in flagged]


def _carries_offsets(lo: np.ndarray, hi: np.ndarray, limit: float) -> bool:
    """The largest magnitude exceeds `limit` times the median swing (max - min) of the channels that vary; a tensor
    without any such channel is not judged here."""
    peak = max(float(abs(lo).max()), float(abs(hi).max()))
    live = _live_swings(lo, hi, peak)
    return bool(live.size) and peak > limit * np.percentile(live, OFFSET_SWING_PERCENTILE)


def _carries_constants(lo: np.ndarray, hi: np.ndarray) -> bool:
    """Every channel constant, at more than one value."""
    peak = max(float(abs(lo).max()), float(abs(hi).max()))
    return not _live_swings(lo, hi, peak).size and bool(lo.max() - lo.min() > 1e-6 * max(peak, 1e-12))


def _live_swings(lo: np.ndarray, hi: np.ndarray, peak: float) -> np.ndarray:
    """The swings (max - min) of the channels that vary; constant channels are left out."""
    swing = hi - lo
    return swing[swing > 1e-6 * max(peak, 1e-12)]


def silu_outputs(model) -> dict[str, str]:
    """For each SiLU written as x * Sigmoid(x): its input x and its sigmoid's output, mapped to its output."""
    sigmoid_input = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Sigmoid"}
    found = {}
    for node in model.graph.node:
        if node.op_type == "Mul" and len(node.input) == 2:
            for x, s in (node.input, node.input[::-1]):
                if sigmoid_input.get(s) == x:
                    found[x] = found[s] = node.output[0]
    return found


def channel_ranges(model, reader: LetterboxCalibrationReader, names: list[str]) -> dict:
    """Each named tensor's per-channel (axis 1) minimum and maximum over the probe images."""
    low, high = {}, {}
    for values in _probe(model, names, reader):
        for name, value in zip(names, values):
            axes = tuple(a for a in range(value.ndim) if a != 1)
            lo, hi = value.min(axis=axes), value.max(axis=axes)
            low[name] = np.minimum(low.get(name, lo), lo)
            high[name] = np.maximum(high.get(name, hi), hi)
    return {name: (low[name], high[name]) for name in names}


def channel_means(model, reader: LetterboxCalibrationReader, names: list[str]) -> dict:
    """Each named NCHW tensor's per-channel mean over the probe images."""
    sums, images = {name: 0.0 for name in names}, 0
    for values in _probe(model, names, reader):
        images += 1
        for name, value in zip(names, values):
            sums[name] = sums[name] + value.mean(axis=(0, 2, 3))
    return {name: total / max(images, 1) for name, total in sums.items()}


def _probe(model, names: list[str], reader: LetterboxCalibrationReader):
    """The named tensors' values (a list in the order of `names`) for each of the first OFFSET_PROBE_IMAGES images."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names if name not in known)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    reader.rewind()
    for _ in range(OFFSET_PROBE_IMAGES):
        feed = reader.get_next()
        if feed is None:
            break
        yield session.run(names, feed)
    reader.rewind()


def correct_biases(quantized, reference, reader: LetterboxCalibrationReader) -> int:
    """Empirical bias correction (Nagel et al., "Data-Free Quantization", 2019), in place: each quantized convolution's
    int32 bias takes away the mean shift, per output channel over the probe images, between its output in `quantized`
    and in the float `reference`; convolutions are corrected shallowest first, so each is measured with its inputs
    already corrected. Rounding shifts the mean of a constant carrier or of a channel that swings by a few levels, and
    such shifts add up over a convolution's input channels; ONNX Runtime's quantizer has no such step. Returns how many
    convolutions it corrected."""
    from onnx import numpy_helper

    producer = {o: n for n in quantized.graph.node for o in n.output}
    reference_output = {n.name: n.output[0] for n in reference.graph.node}  # the quantizer renames graph outputs
    biases = {}  # conv output -> (its int32 bias, that bias's scale, the conv's output in the reference)
    for node in quantized.graph.node:
        source = producer.get(node.input[2]) if node.op_type == "Conv" and len(node.input) > 2 else None
        if source is not None and source.op_type == "DequantizeLinear":
            biases[node.output[0]] = (source.input[0], source.input[1], reference_output[node.name])
    reference_means = channel_means(reference, reader, [b[2] for b in biases.values()])
    initializers = {t.name: t for t in quantized.graph.initializer}
    for group in _by_depth(quantized, set(biases)):
        means = channel_means(quantized, reader, group)
        for output in group:
            bias_name, scale_name, reference_name = biases[output]
            bias, scale = (numpy_helper.to_array(initializers[name]) for name in (bias_name, scale_name))
            shift = np.round((means[output] - reference_means[reference_name]) / scale)
            initializers[bias_name].CopyFrom(numpy_helper.from_array((bias - shift).astype(np.int32), bias_name))
    return len(biases)


def _by_depth(model, outputs: set[str]) -> list[list[str]]:
    """`outputs` grouped by how many of them lie on the longest path from the graph's input to each, shallowest
    first: no output depends on another of its group."""
    depth = {}
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        above = max((depth.get(t, 0) for t in node.input), default=0)
        for output in node.output:
            depth[output] = above + (output in outputs)
    groups = {}
    for output in outputs:
        groups.setdefault(depth[output], []).append(output)
    return [sorted(groups[d]) for d in sorted(groups)]


def calibration_images(data: str | Path, count: int = CALIBRATION_IMAGES, seed: int = 0) -> list[Path]:
    """Up to `count` training images, none of which belongs to the validation split."""
    from yoloslim.data import split_images

    if count < 1:
        raise YoloslimError(f"count is {count}; INT8 calibration needs at least 1 image")
    train, _ = split_images(data, "train")
    if not train:
        raise YoloslimError(
            f"the train split of {data} has no images, so the calibration set would be empty; put training images in it"
        )
    val, _ = split_images(data, "val")
    held_out = {p.resolve() for p in val}
    usable = [p for p in train if p.resolve() not in held_out]
    if not usable:
        raise YoloslimError(
            f"every training image of {data} is also in its val split (train and val are the same images), so "
            "calibrating on them would leak into the mAP measured on val; give the dataset a separate train split"
        )
    random.Random(seed).shuffle(usable)
    return usable[:count]


class LetterboxCalibrationReader:
    """ONNX Runtime CalibrationDataReader feeding letterboxed images in batches of the model's static batch size (the
    last batch filled from the first images: every statistic here is a range or a mean over images, which a repeat
    barely moves)."""

    def __init__(self, images: list[Path], input_name: str, imgsz: int, batch: int = 1):
        self.images, self.input_name, self.imgsz, self.batch = list(images), input_name, imgsz, batch
        self.index = 0

    def get_next(self):
        import cv2

        from yoloslim.runtime.preprocess import preprocess

        if self.index >= len(self.images):
            return None
        paths = [self.images[(self.index + i) % len(self.images)] for i in range(self.batch)]
        self.index += self.batch
        images = [cv2.imread(str(path)) for path in paths]
        for path, image in zip(paths, images):
            if image is None:
                raise YoloslimError(f"cannot read calibration image {path}")
        return {self.input_name: preprocess(images, self.imgsz)[0]}

    def rewind(self):
        self.index = 0


def int8_name(stem: str, target: str) -> str:
    """The INT8 file's default name: the two flavours differ, so neither overwrites the other."""
    return f"{stem}-int8{'-cpu' if target == 'cpu' else ''}.onnx"


def quantize_int8(
    onnx_path: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    count: int = CALIBRATION_IMAGES,
    target: str = "tensorrt",
) -> Path:
    """Write a Q/DQ INT8 ONNX of a static-shape FP32 ONNX, calibrated on the dataset's training images, placed for
    `target`: "tensorrt" (TensorRT's rules) or "cpu" (ONNX Runtime's CPU kernels)."""
    import onnx

    if target not in TARGETS:
        raise YoloslimError(f"unknown INT8 target {target!r}; use tensorrt or cpu")
    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if not all(d.dim_value for d in dims):
        raise YoloslimError(
            f"{onnx_path} has a dynamic input shape; INT8 calibration needs a static one (export with --batch N)"
        )
    imgsz = dims[2].dim_value
    written = output_path(out, onnx_path.with_name(int8_name(onnx_path.stem, target)), onnx_path)
    reader = LetterboxCalibrationReader(
        calibration_images(data, count), model.graph.input[0].name, imgsz, batch=dims[0].dim_value
    )
    head = head_nodes_kept_in_float(model)
    placement = cpu_placement(model, reader, head) if target == "cpu" else tensorrt_placement(model, reader, head)
    with atomic_path(written) as tmp:
        quantize_placed(onnx_path, tmp, reader, placement)
        quantized = onnx.load(str(tmp))
        if target == "cpu":
            correct_biases(quantized, model, reader)
        _copy_metadata(model, quantized, target)
        onnx.save(quantized, str(tmp))
    return written


def quantize_placed(source: Path, dest: Path, reader, placement: dict) -> None:
    """ONNX Runtime's quantize_static with what both flavours share (Q/DQ, per-channel int8 weights, min-max ranges
    from `reader`) and a flavour's `placement` (tensorrt_placement, cpu_placement)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with _without_preprocessing_advice():
        quantize_static(
            str(source),
            str(dest),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            **placement,
        )


class _PreprocessingAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextmanager
def _without_preprocessing_advice():
    """quantize_static advises ONNX Runtime's quantization pre-processing twice per call, on the root logger. It does
    not apply here: the placements name nodes of the exported graph, which that pre-processing's graph optimisation
    would fuse and rename."""
    advice = _PreprocessingAdvice()
    logging.getLogger().addFilter(advice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(advice)


def tensorrt_placement(model, reader: LetterboxCalibrationReader, head: list[str]) -> dict:
    """quantize_static's options for TensorRT: symmetric int8, Q/DQ on the inputs of the convolutions only (TensorRT's
    first placement rule); adds, concats, pools and resizes see dequantized values. Quantizing those too, and each
    conv's output before its SiLU, lost 3.8 mAP50-95 points on a pruned synthetic model where this loses 1.7
    (docs/deployment.md)."""
    from onnxruntime.quantization import QuantType

    return dict(
        op_types_to_quantize=["Conv"],
        activation_type=QuantType.QInt8,
        nodes_to_exclude=head + convs_with_offset_inputs(model, reader, set(head)),
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,
            "OpTypesToExcludeOutputQuantization": ["Conv"],
        },
    )


def cpu_placement(model, reader: LetterboxCalibrationReader, head: list[str]) -> dict:
    """quantize_static's options for ONNX Runtime's CPU provider (see the module docstring): a tensor kept in float
    takes its producer and all its consumers out of quantization, since quantize_static puts Q/DQ on every tensor that
    any quantized node reads or writes."""
    from onnxruntime.quantization import QuantType

    images = {i.name for i in model.graph.input}
    stem = {n.name for n in model.graph.node if n.op_type == "Conv" and n.input[0] in images}
    skip = set(head) | stem | attention_cores(model)
    kept = set(tensors_with_offsets(model, reader, skip))
    touching = {n.name for n in model.graph.node if kept & {*n.input, *n.output}}
    return dict(
        op_types_to_quantize=CPU_OP_TYPES,
        activation_type=QuantType.QUInt8,
        reduce_range=True,  # 7-bit weights: no int16 overflow in the uint8 x int8 kernels of CPUs without VNNI
        nodes_to_exclude=sorted(skip | touching),
        extra_options={"WeightSymmetric": True},
    )


def attention_cores(model) -> set[str]:
    """The nodes of each attention block (a scope with a MatMul and a Softmax; DFL's softmax has no MatMul) other than
    its convolutions: the query scaling, the scores, the softmax, the weighted sum. The CPU flavour keeps them in
    float: the block runs once, on the smallest map, so int8 there buys little time, and quantization-aware training
    could only emulate Q/DQ on tensors that Ultralytics' Attention makes and reads inside its own forward by rewriting
    that forward. Its convolutions (qkv, the positional depthwise convolution, the projection) are quantized as any
    other."""
    scope = {n.name: n.name.rsplit("/", 1)[0] + "/" for n in model.graph.node}
    with_matmul = {scope[n.name] for n in model.graph.node if n.op_type == "MatMul"}
    scopes = tuple(scope[n.name] for n in model.graph.node if n.op_type == "Softmax" and scope[n.name] in with_matmul)
    return {n.name for n in model.graph.node if n.op_type != "Conv" and scopes and n.name.startswith(scopes)}


def _copy_metadata(source, quantized, target: str) -> None:
    """Keep Ultralytics' metadata (names, stride, imgsz), mark the precision and the flavour."""
    from yoloslim.export.onnx import set_metadata

    props = {p.key: p.value for p in source.metadata_props}
    set_metadata(quantized, {**props, "precision": "int8", INT8_TARGET_KEY: target})


def check_tensorrt_qdq(model) -> list[str]:
    """Every way the Q/DQ graph departs from what TensorRT accepts; empty when it complies."""
    from onnx import TensorProto, numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    # int8 weights stored behind a DequantizeLinear, or float weights passed through a QuantizeLinear first
    quantized_weights = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in init}
    problems = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = init.get(node.input[1])
        zero = init.get(node.input[2]) if len(node.input) > 2 else None
        if zero is None or zero.dtype != np.int8:
            problems.append(f"{node.name}: zero point must be an int8 initializer")
        elif np.any(zero != 0):
            problems.append(f"{node.name}: zero point must be 0")
        if scale is None:
            problems.append(f"{node.name}: scale must be an initializer")
            continue
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            # TensorRT's ONNX parser refuses non-positive scales (8.5 to 10.x); a dead channel calibrates to 0
            problems.append(f"{node.name}: scales must be finite and positive")
        is_weight = node.input[0] in init or node.input[0] in quantized_weights
        if is_weight:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if node.op_type == "DequantizeLinear" and node.input[0] in init and init[node.input[0]].dtype != np.int8:
                problems.append(f"{node.name}: weights must be int8 (int32 bias Q/DQ is not allowed)")
            elif scale.size > 1 and axis != 0:
                problems.append(f"{node.name}: per-channel weight scales must be on axis 0, not {axis}")
        elif scale.size != 1:
            problems.append(f"{node.name}: activation scales must be per-tensor")
    for t in model.graph.initializer:
        if t.data_type == TensorProto.INT32 and any(
            t.name == n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"
        ):
            problems.append(f"{t.name}: int32 tensor behind a DequantizeLinear")
    return problems
