"""Quantization-aware training (QAT): INT8 fake quantization in the PyTorch model exactly where yoloslim's Q/DQ
export puts Q/DQ, and the export of such a model with its own scales, without calibration data.

Where: read from the Q/DQ graph itself. prepare_qat exports the model to FP32 ONNX and quantizes it as `yoloslim
export --precision int8 --target T` does (qdq.py: the same placement rules, head and offset-carrying convolutions in
float, min-max ranges from training images through the inference letterbox), then puts a fake quantizer, with that
Q/DQ pair's scale and zero point, at the place in the PyTorch model that computes each tensor the graph quantizes, and
fake-quantizes the weights of each convolution whose weights the graph quantizes (per output channel, 127 levels for
TensorRT, 64 for the CPU flavour's 7 bits). Every reader of a quantized tensor reads the dequantized value in both
flavours' graphs, so each quantizer sits where the tensor is made:
- the convolution output, its SiLU's sigmoid and the SiLU's product inside Ultralytics' Conv (QuantConv);
- the pieces of a Conv block's output that a Split hands on (C2f's and C3k2's chunks, C2PSA's halves), each on its own
  grid, at the end of that block (SplitQuant), so the Bottleneck, the residual Add and the Concat that read a piece all
  read it quantized;
- a module's output (a Bottleneck's residual Add, a Concat layer), through a forward hook;
- the sum between the attention and the feed-forward of a PSABlock, read by both inside it (QuantPSABlock);
- the input of the Conv blocks that read it, where the tensor is made inside a larger module's forward (C3's Concat)
  or is the image.
MaxPool and Resize outputs that share their input's scale and zero point (ONNX Runtime places them so) add nothing to
an input already on that grid and need no quantizer. A tensor that fits none of these is refused, not approximated.

Ranges are held, not learnt: the calibrated scales and zero points are buffers, and training adapts the weights to
them. Weight scales follow the weights (max |w| per output channel, as the export computes them from the trained
weights); on BatchNorm's unfolded weights that gives the same integers as on the folded ones, since folding scales
each output channel by one factor.

Why under export/: the placement rules, the calibration and the Q/DQ writer live in qdq.py, and fake quantization is
that quantization emulated in training. The finetune stage imports it from here; export never imports finetune code.
Checkpoints pickle QuantConv and the hooks by their names here.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from ultralytics.nn.modules.block import PSABlock
from ultralytics.nn.modules.conv import Conv

from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.files import atomic_path, output_path

QAT_KEY = "qat"  # in the checkpoint's yoloslim metadata: the flavour, imgsz and the export's placement
WEIGHT_LEVELS = {"tensorrt": 127, "cpu": 64}  # symmetric int8 weights; the CPU flavour's reduce_range keeps 7 bits
# What an ONNX QuantizeLinear saturates to, by zero point type
_SATURATION = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}
_SAME_GRID_OPS = {"MaxPool", "Resize"}  # output on the input's grid when they share its scale and zero point


class FakeQuant(nn.Module):
    """One activation Q/DQ pair of the exported graph (its tensor's name kept): quantize, saturate, dequantize."""

    def __init__(self, tensor: str, scale: float, zero_point: int, qmin: int, qmax: int):
        super().__init__()
        self.tensor, self.qmin, self.qmax = tensor, qmin, qmax
        # The scale is held as the bits of a float32: Ultralytics saves checkpoints in half precision, which would
        # round it (and flush a scale under 6e-8 to zero), while an integer buffer passes through exactly.
        self.register_buffer("scale_bits", torch.tensor([scale], dtype=torch.float32).view(torch.int32))
        self.register_buffer("zero_point", torch.tensor([zero_point], dtype=torch.int32))

    @property
    def scale(self) -> torch.Tensor:
        return self.scale_bits.view(torch.float32)

    @scale.setter
    def scale(self, value: torch.Tensor) -> None:
        self.scale_bits.copy_(torch.as_tensor(value, dtype=torch.float32).reshape(1).view(torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fake_quantize(x, self.scale, self.zero_point.float(), self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"{self.tensor}, scale={float(self.scale):.6g}, zero_point={int(self.zero_point)}"


def fake_quantize_weight(weight: torch.Tensor, levels: int) -> torch.Tensor:
    """Symmetric per-output-channel quantization to [-levels, levels], computed as ONNX Runtime's quantizer computes
    it: scale 2 max|w| / 2 levels in float64 stored as float32 (1 for an all-zero channel), round(w / scale)."""
    absmax = weight.detach().abs().amax(dim=tuple(range(1, weight.ndim)), keepdim=True).double()
    scale = (2 * absmax / (2 * levels)).float()
    scale = torch.where(scale >= torch.finfo(torch.float32).tiny, scale, torch.ones_like(scale))
    return _fake_quantize(weight, scale, torch.zeros_like(scale), -levels, levels)


def _fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """ONNX QuantizeLinear then DequantizeLinear, in float32: saturate(round_half_even(x / scale) + zero), by division
    as ONNX Runtime does (torch's own fake quantization multiplies by 1 / scale and rounds some values the other way).
    The gradient passes straight through where x is inside the range and is zero where it saturates."""
    value = x.float()
    level = torch.round(value / scale) + zero
    inside = (level >= qmin) & (level <= qmax)
    quantized = (torch.clamp(level, qmin, qmax) - zero) * scale
    return (quantized.detach() + (value - value.detach()) * inside).to(x.dtype)


def _quantize(module: nn.Module, slot: str, x: torch.Tensor) -> torch.Tensor:
    """`x` through the module's fake quantizer in `slot`, or unchanged where it has none (float there)."""
    quantizer = module._modules.get(slot)
    return x if quantizer is None else quantizer(x)


def _quantize_output_hook(module: nn.Module, args, output):
    return module.qat_output(output)


class QuantConv(Conv):
    """Ultralytics' Conv (act(bn(conv(x)))) with fake quantization where the exported graph has Q/DQ: the conv's input
    and weights, its output, and its SiLU's sigmoid and product (the graph writes SiLU as x * Sigmoid(x)). None: float
    there. After Ultralytics' fuse() the same quantization applies to the folded conv (forward_fuse)."""

    weight_levels = 0  # 0: float weights

    def forward(self, x):
        return self._activate(self.bn(self._convolve(x)))

    def forward_fuse(self, x):
        return self._activate(self._convolve(x))

    def _convolve(self, x):
        weight = self.conv.weight
        if self.weight_levels:
            weight = fake_quantize_weight(weight, self.weight_levels)
        return self.conv._conv_forward(_quantize(self, "qat_input", x), weight, self.conv.bias)

    def _activate(self, y):
        y = _quantize(self, "qat_output", y)
        y = y * _quantize(self, "qat_sigmoid", torch.sigmoid(y)) if "qat_sigmoid" in self._modules else self.act(y)
        return _quantize(self, "qat_split", _quantize(self, "qat_act", y))


class SplitQuant(nn.Module):
    """The Q/DQ pairs on the outputs of a channel Split that reads a Conv block's output: each piece (channel ranges of
    `sizes`) through its own fake quantizer, or float where the graph leaves that piece unquantized. Applied to the
    whole tensor before the module that splits it, it gives every reader of a piece the quantized piece."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.sizes = list(sizes)
        self.pieces = nn.ModuleDict()  # str(piece index) -> FakeQuant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = x.split(self.sizes, 1)
        return torch.cat([_quantize(self.pieces, str(i), piece) for i, piece in enumerate(pieces)], 1)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


class QuantPSABlock(PSABlock):
    """Ultralytics' PSABlock with fake quantization of the sum between its attention and its feed-forward, which both
    the feed-forward's first convolution and the second residual Add read (None: float there)."""

    def forward(self, x):
        x = x + self.attn(x) if self.add else self.attn(x)
        x = _quantize(self, "qat_mid", x)
        return x + self.ffn(x) if self.add else self.ffn(x)


def is_qat(model: nn.Module) -> bool:
    """Whether `model` carries yoloslim's fake quantization."""
    return any(isinstance(m, (FakeQuant, QuantConv, QuantPSABlock)) for m in model.modules())


def prepare_qat(model: nn.Module, target: str, data, imgsz: int, count: int) -> dict:
    """Put INT8 fake quantization into a detection model, in place, where `yoloslim export --precision int8 --target
    target` puts Q/DQ, with the ranges that export calibrates on up to `count` training images of `data`; return the
    record the QAT checkpoint keeps (flavour, imgsz, the export's placement) so that its export needs no data."""
    import onnx

    from yoloslim.export.qdq import (
        TARGETS,
        LetterboxCalibrationReader,
        cpu_placement,
        head_nodes_kept_in_float,
        quantize_placed,
        tensorrt_placement,
    )

    if target not in TARGETS:
        raise YoloslimError(f"unknown INT8 target {target!r}; use tensorrt or cpu")
    images = qat_calibration_images(model, data, count)
    with tempfile.TemporaryDirectory(prefix="yoloslim-qat-") as work:
        fp32 = _float_onnx(model, imgsz, Path(work))
        graph = onnx.load(str(fp32))
        reader = LetterboxCalibrationReader(images, graph.graph.input[0].name, imgsz)
        head = head_nodes_kept_in_float(graph)
        placement = cpu_placement(graph, reader, head) if target == "cpu" else tensorrt_placement(graph, reader, head)
        quantize_placed(fp32, Path(work) / "int8.onnx", reader, placement)
        place_fake_quant(model, onnx.load(str(Path(work) / "int8.onnx")), WEIGHT_LEVELS[target])
    return {"target": target, "imgsz": imgsz, "placement": _placement_record(placement)}


def qat_calibration_images(model: nn.Module, data, count: int) -> list[Path]:
    """The training images that calibrate a model's QAT ranges; refuses a model that already has fake quantization
    and a dataset that calibration refuses (finetune checks this before Ultralytics sets up a run)."""
    from yoloslim.export.qdq import calibration_images

    if is_qat(model):
        raise YoloslimError("this model is already quantization-aware; finetune it without qat to go on training it")
    return calibration_images(data, count)


def _float_onnx(model: nn.Module, imgsz: int, work: Path) -> Path:
    """The FP32 ONNX that yoloslim export writes for `model`."""
    from copy import deepcopy

    from yoloslim.export.onnx import export_onnx

    checkpoint = work / "float.pt"
    torch.save({"model": deepcopy(model).float().eval(), "train_args": {}}, checkpoint)
    return export_onnx(checkpoint, imgsz=imgsz, out=work / "float.onnx")


def place_fake_quant(model: nn.Module, graph, weight_levels: int) -> None:
    """Fake quantizers, in place, at the PyTorch counterpart of every activation Q/DQ pair of the Q/DQ `graph` (with
    its scale and zero point), and fake-quantized weights in the Conv blocks whose weights `graph` quantizes."""
    from onnx import numpy_helper

    modules = dict(model.named_modules(remove_duplicate=False))  # Conv blocks share one SiLU instance
    init = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    producer = {o: n for n in graph.graph.node for o in n.output}
    readers = {}
    for node in graph.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for node in graph.graph.node:
        weight = producer.get(node.input[1]) if node.op_type == "Conv" else None
        if weight is not None and weight.op_type == "DequantizeLinear":
            _as_quant_conv(_conv_block(modules, node), node.name).weight_levels = weight_levels
    for tensor, (quantize, consumers) in _activation_pairs(graph, init, readers).items():
        scale, zero = init[quantize.input[1]], init[quantize.input[2]]
        source = producer.get(tensor)
        if _repeats_input_grid(source, producer, init, scale, zero):
            continue
        raw = [r for r in readers.get(tensor, []) if r is not quantize]
        quantizer = FakeQuant(tensor, float(scale), int(zero), *_SATURATION[zero.dtype])
        if raw:
            _place_at_readers(modules, consumers, quantizer)
        elif getattr(source, "op_type", None) == "Split":
            _place_at_split(modules, source, tensor, quantizer, producer, init, readers)
        elif not _place_at_source(modules, source, quantizer, consumers):
            _place_at_readers(modules, consumers, quantizer)


def _activation_pairs(graph, init: dict, readers: dict) -> dict:
    """Each quantized activation of the graph: tensor -> (its QuantizeLinear, the nodes that read its dequantized
    value)."""
    pairs = {}
    for node in graph.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in init:
            dequantized = [r for r in readers.get(node.output[0], []) if r.op_type == "DequantizeLinear"]
            pairs[node.input[0]] = (node, [c for d in dequantized for c in readers.get(d.output[0], [])])
    return pairs


def _repeats_input_grid(source, producer: dict, init: dict, scale, zero) -> bool:
    """A MaxPool or Resize that reads a dequantized tensor with the same scale and zero point as its own Q/DQ: its
    output is already on that grid, so that Q/DQ changes nothing."""
    dequantize = producer.get(source.input[0]) if source is not None and source.op_type in _SAME_GRID_OPS else None
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return False
    return bool(init[dequantize.input[1]] == scale and init[dequantize.input[2]] == zero)


def _place_at_source(modules: dict, source, quantizer: FakeQuant, readers: list) -> bool:
    """Attach `quantizer` where the tensor is made: a Conv block's conv output, sigmoid or SiLU output, or the output
    of the module whose scope makes it when nodes outside that scope read it. False when neither fits."""
    if source is None:
        return False
    scope = source.name.rsplit("/", 1)[0]
    path = _module_path(modules, scope)
    if path is None:
        return False
    parent = path.rsplit(".", 1)[0] if "." in path else None
    block = modules.get(parent)
    slot = {"Conv": "qat_output", "Sigmoid": "qat_sigmoid", "Mul": "qat_act"}.get(source.op_type)
    if isinstance(block, Conv) and slot and path.endswith((".conv", ".act")):
        if slot == "qat_sigmoid" and not isinstance(block.act, nn.SiLU):
            return False
        setattr(_as_quant_conv(block, source.name), slot, quantizer)
        return True
    module = modules[path]
    read_outside = any(not r.name.startswith(scope + "/") for r in readers)
    if isinstance(module, PSABlock) and source.op_type == "Add" and not read_outside:
        _as_quant_twin(module, PSABlock, QuantPSABlock, source.name).qat_mid = quantizer
        return True
    if isinstance(module, Conv) or not read_outside:
        return False  # made inside a module's forward and read there: not that module's output
    module.qat_output = quantizer
    module.register_forward_hook(_quantize_output_hook)
    return True


def _place_at_split(modules: dict, split, tensor: str, quantizer: FakeQuant, producer: dict, init: dict, readers: dict):
    """Attach `quantizer` to its piece of the SplitQuant at the end of the Conv block whose output `split` cuts along
    the channels; refused when the split reads anything else or that output has other readers."""
    whole = split.input[0]
    only_reader = len(readers.get(whole, [])) == 1
    source = producer.get(whole)
    if source is not None and source.op_type == "DequantizeLinear":  # the whole output is quantized as well
        whole = producer[source.input[0]].input[0]
        source = producer.get(whole)
        only_reader = only_reader and len(readers.get(whole, [])) == 1
    path = _module_path(modules, source.name.rsplit("/", 1)[0]) if source is not None else None
    block = modules.get(path.rsplit(".", 1)[0]) if path and path.endswith((".conv", ".act")) else None
    axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
    if block is None or axis != 1 or not only_reader:
        _refuse(split.name)
    block = _as_quant_conv(block, split.name)
    if "qat_split" not in block._modules:
        block.qat_split = SplitQuant(_split_sizes(split, init, block.conv.out_channels))
    block.qat_split.pieces[str(list(split.output).index(tensor))] = quantizer


def _split_sizes(split, init: dict, channels: int) -> list[int]:
    """The channels of each output of an ONNX Split of `channels` channels: its `split` input or attribute, or equal
    pieces."""
    if len(split.input) > 1 and split.input[1]:
        if split.input[1] not in init:
            _refuse(split.name)  # sizes computed at run time
        return [int(size) for size in init[split.input[1]]]
    attribute = next((list(a.ints) for a in split.attribute if a.name == "split"), None)
    return attribute or [channels // len(split.output)] * len(split.output)


def _place_at_readers(modules: dict, readers: list, quantizer: FakeQuant) -> None:
    """Attach `quantizer` (shared) to the input of each Conv block that reads the tensor; refuse anything else."""
    for reader in readers:
        block = _conv_block(modules, reader) if reader.op_type == "Conv" else None
        _as_quant_conv(block, reader.name).qat_input = quantizer


def _conv_block(modules: dict, conv_node):
    """The Ultralytics Conv block whose convolution an ONNX Conv node is, or None."""
    path = _module_path(modules, conv_node.name.rsplit("/", 1)[0])
    parent = modules.get(path.rsplit(".", 1)[0]) if path and path.endswith(".conv") else None
    return parent if isinstance(parent, Conv) else None


def _as_quant_conv(block: nn.Module | None, node: str) -> QuantConv:
    """The Conv block computing ONNX node `node`, as a QuantConv (its class swapped in place; Conv subclasses that only
    change __init__, such as DWConv, compute the same); refused when there is no such block."""
    return _as_quant_twin(block, Conv, QuantConv, node)


def _as_quant_twin(block: nn.Module | None, base: type, twin: type, node: str) -> nn.Module:
    """`block` with its class swapped in place for `twin`, the fake-quantizing copy of `base`'s forward (subclasses of
    `base` that only change __init__ compute the same); refused in one line when `block` does not compute `base`'s
    forward."""
    if block is None or (type(block).forward is not base.forward and not isinstance(block, twin)):
        _refuse(node)
    if not isinstance(block, twin):
        block.qat_base = type(block)
        block.__class__ = twin
    return block


def _refuse(node: str):
    """The one-line refusal of a Q/DQ pair that no place in the PyTorch model computes as the graph does."""
    raise YoloslimError(
        f"quantization-aware training places INT8 in Ultralytics Conv blocks, and {node} is not in one; finetune "
        "without qat and export with calibration"
    )


def _module_path(modules: dict, scope: str) -> str | None:
    """The module path of an ONNX node scope such as /model.24/cv2.0/cv2.0.0/conv: each part names a child of the
    module of the part before or of one of its ancestors (the exporter names a container's children from the
    container's own parent). None when a part names no module (a module called more than once: /model.9/m_1)."""
    path = None
    for part in scope.strip("/").split("/"):
        candidates = [part] if path is None else [f"{a}.{part}" for a in _self_and_ancestors(path)]
        path = next((c for c in candidates if c in modules), None)
        if path is None:
            return None
    return path


def _self_and_ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _placement_record(placement: dict) -> dict:
    """quantize_static's placement options as plain data for the checkpoint (its activation type by name)."""
    return {**placement, "activation_type": placement["activation_type"].name}


_SLOTS = ("qat_input", "qat_output", "qat_sigmoid", "qat_act", "qat_split", "qat_mid")


def strip_qat(model: nn.Module) -> None:
    """Take the fake quantization out of `model`, in place, leaving the float model it trains (a plain model is left
    as it is): the FP32 ONNX is exported from this, and the Q/DQ graph then written around it."""
    for module in list(model.modules()):
        for slot in _SLOTS:
            module._modules.pop(slot, None)
        for key, hook in list(module._forward_hooks.items()):
            if hook is _quantize_output_hook:
                del module._forward_hooks[key]
        if isinstance(module, (QuantConv, QuantPSABlock)):
            module.__dict__.pop("weight_levels", None)
            module.__class__ = module.__dict__.pop("qat_base")
            if "forward" in module.__dict__:  # fused: Ultralytics bound forward_fuse to the instance
                module.forward = module.forward_fuse


def trained_scales(model: nn.Module) -> dict[str, tuple[float, int]]:
    """Each fake-quantized tensor's scale and zero point, by its name in the ONNX graph."""
    return {m.tensor: (float(m.scale), int(m.zero_point)) for m in model.modules() if isinstance(m, FakeQuant)}


@dataclass(frozen=True)
class TrainedQuantization:
    """What the INT8 export of a QAT checkpoint needs: its flavour, the placement its finetune used, its scales."""

    target: str
    placement: dict
    scales: dict


def trained_quantization(weights: str | Path, target: str) -> TrainedQuantization | None:
    """The trained quantization of a QAT checkpoint for an INT8 export placed for `target`; None for a checkpoint
    finetuned without qat. Refuses a file that is not a detection checkpoint, and a target other than the trained
    one."""
    from yoloslim.utils.checks import load_detection_checkpoint
    from yoloslim.utils.metadata import checkpoint_metadata

    model, ckpt = load_detection_checkpoint(weights, classic=True)  # a classic checkpoint has no qat record
    record = checkpoint_metadata(ckpt).get(QAT_KEY)
    if not record:
        return None
    if target != record["target"]:
        raise YoloslimError(
            f"{Path(weights).name} was finetuned quantization-aware for the {record['target']} INT8 flavour, not "
            f"{target}; export it with target {record['target']}, or finetune for {target} with qat"
        )
    return TrainedQuantization(record["target"], record["placement"], trained_scales(model))


def quantize_trained(onnx_path: str | Path, trained: TrainedQuantization, out: str | Path | None = None) -> Path:
    """The Q/DQ ONNX of a QAT model's FP32 ONNX: its finetune's placement with its own scales and zero points. No
    calibration data: ONNX Runtime's quantizer runs its calibration pass on one gray image, and every range it would
    set there is given."""
    import onnx
    from onnxruntime.quantization import QuantType

    from yoloslim.export.qdq import _copy_metadata, int8_name, quantize_placed

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path))
    placement = {**trained.placement, "activation_type": QuantType[trained.placement["activation_type"]]}
    dtype = np.uint8 if placement["activation_type"] == QuantType.QUInt8 else np.int8
    overrides = {
        tensor: [{"scale": np.array(scale, np.float32), "zero_point": np.array(zero, dtype)}]
        for tensor, (scale, zero) in trained.scales.items()
    }
    placement["extra_options"] = {**placement.get("extra_options", {}), "TensorQuantOverrides": overrides}
    written = output_path(out, onnx_path.with_name(int8_name(onnx_path.stem, trained.target)), onnx_path)
    with atomic_path(written) as tmp:
        quantize_placed(onnx_path, tmp, _GrayImage(model), placement)
        quantized = onnx.load(str(tmp))
        _check_trained_scales(quantized, trained.scales)
        _copy_metadata(model, quantized, trained.target)
        onnx.save(quantized, str(tmp))
    return written


class _GrayImage:
    """A calibration reader with one mid-gray image (the letterbox's padding colour) of the model's input shape."""

    def __init__(self, model):
        dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        self.feed = {model.graph.input[0].name: np.full(dims, 114 / 255, np.float32)}
        self.done = False

    def get_next(self):
        if self.done:
            return None
        self.done = True
        return self.feed

    def rewind(self):
        self.done = False


def _check_trained_scales(quantized, scales: dict) -> None:
    """Every activation Q/DQ of the written graph carries its trained scale and zero point, except MaxPool and Resize
    outputs, which share their input's; anything else means the placement no longer matches the model."""
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    producer = {o: n for n in quantized.graph.node for o in n.output}
    for node in quantized.graph.node:
        tensor = node.input[0]
        if node.op_type != "QuantizeLinear" or tensor in init:
            continue
        if tensor not in scales:
            if getattr(producer.get(tensor), "op_type", None) in _SAME_GRID_OPS:
                continue
            raise YoloslimError(f"{tensor} is quantized in the export but was not in quantization-aware training")
        found = (float(init[node.input[1]]), int(init[node.input[2]]))
        if found != (np.float32(scales[tensor][0]), scales[tensor][1]):
            raise YoloslimError(f"{tensor} got scale and zero point {found}, not its trained {scales[tensor]}")
