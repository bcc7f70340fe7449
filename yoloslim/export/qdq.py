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
"""

from __future__ import annotations

import random
import re
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
_HEAD_INNER = re.compile(r"/cv[23]\.\d+/cv[23]\.\d+\.[01]/")  # the head's inner conv blocks, quantized like the body


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
    import onnx
    import onnxruntime as ort

    inputs = {i.name for i in model.graph.input}  # the image itself is not an activation
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name not in skip and n.input[0] not in inputs]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = list(dict.fromkeys(n.input[0] for n in convs))
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names if name not in known)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    low, high = {}, {}
    reader.rewind()
    for _ in range(OFFSET_PROBE_IMAGES):
        feed = reader.get_next()
        if feed is None:
            break
        for name, value in zip(names, session.run(names, feed)):
            lo, hi = value.min(axis=(0, 2, 3)), value.max(axis=(0, 2, 3))
            low[name] = np.minimum(low.get(name, lo), lo)
            high[name] = np.maximum(high.get(name, hi), hi)
    reader.rewind()
    flagged = []
    for node in convs:
        lo, hi = low[node.input[0]], high[node.input[0]]
        peak, swing = max(abs(lo).max(), abs(hi).max()), hi - lo
        live = swing[swing > 1e-6 * max(peak, 1e-12)]
        if live.size and peak > limit * np.median(live):
            flagged.append(node.name)
    return flagged


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
    """ONNX Runtime CalibrationDataReader feeding letterboxed images one by one."""

    def __init__(self, images: list[Path], input_name: str, imgsz: int):
        self.images, self.input_name, self.imgsz = list(images), input_name, imgsz
        self.index = 0

    def get_next(self):
        import cv2

        from yoloslim.runtime.preprocess import preprocess

        if self.index >= len(self.images):
            return None
        path = self.images[self.index]
        self.index += 1
        image = cv2.imread(str(path))
        if image is None:
            raise YoloslimError(f"cannot read calibration image {path}")
        return {self.input_name: preprocess([image], self.imgsz)[0]}

    def rewind(self):
        self.index = 0


def quantize_int8(
    onnx_path: str | Path, data: str | Path, out: str | Path | None = None, count: int = CALIBRATION_IMAGES
) -> Path:
    """Write a Q/DQ INT8 ONNX of a static-shape FP32 ONNX, calibrated on the dataset's training images."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if not all(d.dim_value for d in dims):
        raise YoloslimError(
            f"{onnx_path} has a dynamic input shape; INT8 calibration needs a static one (export with --batch N)"
        )
    imgsz = dims[2].dim_value
    target = output_path(out, onnx_path.with_name(f"{onnx_path.stem}-int8.onnx"), onnx_path)
    reader = LetterboxCalibrationReader(calibration_images(data, count), model.graph.input[0].name, imgsz)
    head = head_nodes_kept_in_float(model)
    with atomic_path(target) as tmp:
        quantize_static(
            str(onnx_path),
            str(tmp),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=head + convs_with_offset_inputs(model, reader, set(head)),
            calibrate_method=CalibrationMethod.MinMax,
            # Q/DQ on the inputs of the convolutions only (TensorRT's first placement rule); adds, concats, pools and
            # resizes see dequantized values. Quantizing those too, and each conv's output before its SiLU, lost 3.8
            # mAP50-95 points on a pruned synthetic model where this loses 1.7 (docs/deployment.md).
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,
                "OpTypesToExcludeOutputQuantization": ["Conv"],
            },
        )
        _copy_metadata(model, tmp)
    return target


def _copy_metadata(source, path: Path) -> None:
    """Keep Ultralytics' metadata (names, stride, imgsz) and mark the precision."""
    import onnx

    from yoloslim.export.onnx import set_metadata

    quantized = onnx.load(str(path))
    set_metadata(quantized, {**{p.key: p.value for p in source.metadata_props}, "precision": "int8"})
    onnx.save(quantized, str(path))


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
