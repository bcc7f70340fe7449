"""The original YOLOv5 repository's anchor-based detector, written for yoloslim: the Detect head and the model that
runs a layer list described by a model yaml (yolov5n.yaml and its siblings).

As in common.py, attribute names follow the original so that its checkpoints unpickle into these classes and the
state dict keys match. A model built here from a yaml, with the same random seed, starts from the same weights as one
built by the original code.
"""

from __future__ import annotations

import math
from copy import deepcopy
from pathlib import Path

import torch
import yaml
from torch import nn

from yoloslim.models import common
from yoloslim.utils.errors import YoloslimError

_STRIDE_PROBE = 256  # side of the blank image whose output sizes give the strides
_WIDTH_DIVISOR = 8  # scaled layer widths are rounded up to a multiple of this


class Detect(nn.Module):
    """One 1x1 output convolution per level, each predicting na anchors x (x, y, w, h, objectness, classes).

    In training mode the output is the list of raw maps, each (batch, na, ny, nx, no). In eval mode it is
    (boxes, raw maps): every anchor's decoded box in input pixels (centre x, centre y, width, height), with sigmoid
    objectness and class scores, shaped (batch, anchors, no).
    """

    stride = None  # per-level strides, set once the model has run a probe image

    def __init__(self, nc=80, anchors=(), ch=(), inplace=True):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        # The original caches its decoding grids in these lists; they are kept so that a saved model has them.
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        self.anchor_grid = [torch.empty(0) for _ in range(self.nl)]
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))  # in stride units
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self.inplace = inplace

    def forward(self, x):
        raw = [self._level_map(i, feature) for i, feature in enumerate(x)]
        if self.training:
            return raw
        boxes = [self._decode(i, level).view(level.shape[0], -1, self.no) for i, level in enumerate(raw)]
        return torch.cat(boxes, 1), raw

    def _level_map(self, i: int, feature: torch.Tensor) -> torch.Tensor:
        y = self.m[i](feature)
        batch, _, ny, nx = y.shape
        return y.view(batch, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()

    def _decode(self, i: int, level: torch.Tensor) -> torch.Tensor:
        cells, anchor_wh = self._grids(i, nx=level.shape[3], ny=level.shape[2])
        xy, wh, scores = level.sigmoid().split((2, 2, self.no - 4), 4)
        xy = (xy * 2 + cells) * self.stride[i]  # centre offset in (-0.5, 1.5) cells
        wh = (wh * 2) ** 2 * anchor_wh  # size in (0, 4) anchors
        return torch.cat((xy, wh, scores), 4)

    def _grids(self, i: int, nx: int, ny: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each cell's top-left corner minus half a cell, and the level's anchor sizes in pixels."""
        anchors = self.anchors[i]
        rows = torch.arange(ny, device=anchors.device, dtype=anchors.dtype)
        cols = torch.arange(nx, device=anchors.device, dtype=anchors.dtype)
        ys, xs = torch.meshgrid(rows, cols, indexing="ij")
        cells = torch.stack((xs, ys), 2).view(1, 1, ny, nx, 2) - 0.5
        return cells, (anchors * self.stride[i]).view(1, self.na, 1, 1, 2)


class DetectionModel(nn.Module):
    """The layer list of a model yaml, each layer reading the previous output or the saved outputs its `f` names.

    Build one from a yaml (a dict or a path), or get one from a checkpoint via load_classic_checkpoint().
    """

    def __init__(self, cfg: dict | str | Path, ch: int = 3, nc: int | None = None):
        super().__init__()
        self.yaml = deepcopy(cfg) if isinstance(cfg, dict) else _read_yaml(Path(cfg))
        if nc is not None:
            self.yaml["nc"] = nc
        self.yaml["ch"] = ch = self.yaml.get("ch", ch)
        self.model, self.save = build_layers(deepcopy(self.yaml), ch)
        self.names = [str(i) for i in range(self.yaml["nc"])]
        self.inplace = self.yaml.get("inplace", True)
        self._set_strides_and_anchors(ch)
        self._initialize_head_biases()
        _initialize_like_the_original(self)

    def forward(self, x):
        saved = []
        for layer in self.model:
            if layer.f != -1:
                x = saved[layer.f] if isinstance(layer.f, int) else [x if j == -1 else saved[j] for j in layer.f]
            x = layer(x)
            saved.append(x if layer.i in self.save else None)
        return x

    def _apply(self, fn, *args, **kwargs):
        # The head's strides and grids are plain tensor attributes, which .to() and .half() would otherwise skip.
        super()._apply(fn, *args, **kwargs)
        head = self.model[-1]
        head.stride = fn(head.stride)
        head.grid = [fn(g) for g in head.grid]
        if isinstance(head.anchor_grid, list):
            head.anchor_grid = [fn(g) for g in head.anchor_grid]
        return self

    def _set_strides_and_anchors(self, ch: int) -> None:
        """Strides from a probe image (run in training mode, as the original does), anchors in stride units."""
        head = self.model[-1]
        head.inplace = self.inplace
        probe = torch.zeros(1, ch, _STRIDE_PROBE, _STRIDE_PROBE)
        head.stride = torch.tensor([_STRIDE_PROBE / level.shape[-2] for level in self.forward(probe)])
        _order_anchors_like_strides(head)
        head.anchors /= head.stride.view(-1, 1, 1)
        self.stride = head.stride

    def _initialize_head_biases(self) -> None:
        """Objectness and class biases that start near the expected object density (the original's prior)."""
        head = self.model[-1]
        for conv, stride in zip(head.m, head.stride):
            bias = conv.bias.view(head.na, -1)
            bias.data[:, 4] += math.log(8 / (640 / stride) ** 2)  # about 8 objects in a 640 px image
            bias.data[:, 5 : 5 + head.nc] += math.log(0.6 / (head.nc - 0.99999))
            conv.bias = nn.Parameter(bias.view(-1), requires_grad=True)


# Depth and width multiples of the v6.0 to v7.0 releases' P5 sizes, applied to the layout below.
YOLOV5_SCALES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25)}


def yolov5_layout(scale: str = "n", nc: int = 80) -> dict:
    """The model yaml of the original's P5 detector from release v6.0 on (Conv stem, C3, SPPF; anchors for 640 px
    COCO), at one of YOLOV5_SCALES: what yolov5n.yaml and its siblings describe, so a new classic model needs no file.

        DetectionModel(yolov5_layout("n", nc=1))
    """
    if scale not in YOLOV5_SCALES:
        raise YoloslimError(f"unknown YOLOv5 scale {scale!r}; use one of {', '.join(YOLOV5_SCALES)}")
    depth, width = YOLOV5_SCALES[scale]
    backbone = [
        [-1, 1, "Conv", [64, 6, 2, 2]],  # 0: stride 2
        [-1, 1, "Conv", [128, 3, 2]],  # 1: stride 4
        [-1, 3, "C3", [128]],
        [-1, 1, "Conv", [256, 3, 2]],  # 3: stride 8
        [-1, 6, "C3", [256]],
        [-1, 1, "Conv", [512, 3, 2]],  # 5: stride 16
        [-1, 9, "C3", [512]],
        [-1, 1, "Conv", [1024, 3, 2]],  # 7: stride 32
        [-1, 3, "C3", [1024]],
        [-1, 1, "SPPF", [1024, 5]],
    ]
    head = [
        [-1, 1, "Conv", [512, 1, 1]],
        [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
        [[-1, 6], 1, "Concat", [1]],
        [-1, 3, "C3", [512, False]],
        [-1, 1, "Conv", [256, 1, 1]],
        [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
        [[-1, 4], 1, "Concat", [1]],
        [-1, 3, "C3", [256, False]],  # 17: P3 output
        [-1, 1, "Conv", [256, 3, 2]],
        [[-1, 14], 1, "Concat", [1]],
        [-1, 3, "C3", [512, False]],  # 20: P4 output
        [-1, 1, "Conv", [512, 3, 2]],
        [[-1, 10], 1, "Concat", [1]],
        [-1, 3, "C3", [1024, False]],  # 23: P5 output
        [[17, 20, 23], 1, "Detect", ["nc", "anchors"]],
    ]
    anchors = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
    return dict(nc=nc, depth_multiple=depth, width_multiple=width, anchors=anchors, backbone=backbone, head=head)


def build_layers(spec: dict, ch: int) -> tuple[nn.Sequential, list[int]]:
    """The layers of a model yaml and the indices of the layers whose outputs later layers read."""
    nc, anchors = spec["nc"], spec["anchors"]
    if spec.get("activation"):
        raise YoloslimError(
            f"the model yaml sets activation {spec['activation']!r}; yoloslim builds classic models with the default "
            "SiLU only, remove the activation entry"
        )
    outputs = (len(anchors[0]) // 2 if isinstance(anchors, list) else anchors) * (nc + 5)
    names = {"nc": nc, "anchors": anchors, "None": None}  # the names the yamls' arguments use
    widths, layers, save = [ch], [], []
    for i, (f, n, module_name, args) in enumerate(spec["backbone"] + spec["head"]):
        module = _module_class(module_name)
        args = [names.get(a, a) if isinstance(a, str) else a for a in args]
        repeats = max(round(n * spec["depth_multiple"]), 1) if n > 1 else n
        args, c2, repeats = _layer_arguments(module, f, args, repeats, widths, spec["width_multiple"], outputs)
        layer = nn.Sequential(*(module(*args) for _ in range(repeats))) if repeats > 1 else module(*args)
        layer.i, layer.f, layer.type = i, f, original_path(module)
        layer.np = sum(p.numel() for p in layer.parameters())
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(layer)
        widths = [c2] if i == 0 else [*widths, c2]
    return nn.Sequential(*layers), sorted(save)


_CHANNEL_MODULES = (
    common.Conv,
    common.Bottleneck,
    common.C3,
    common.SPPF,
    common.SPP,
    common.Focus,
    common.BottleneckCSP,
)
_REPEATED_INSIDE = (common.C3, common.BottleneckCSP)  # take their depth as an argument instead of being stacked
_MODULES = {cls.__name__: cls for cls in (*_CHANNEL_MODULES, common.Concat, Detect)}
_MODULES.update({"nn.Upsample": nn.Upsample, "torch.nn.Upsample": nn.Upsample})


def _layer_arguments(module, f, args, repeats, widths, width_multiple, outputs):
    """Constructor arguments, output width and repeat count of one layer, scaled as the original scales them."""
    if module in _CHANNEL_MODULES:
        c1, c2 = widths[f], args[0]
        if c2 != outputs:
            c2 = math.ceil(c2 * width_multiple / _WIDTH_DIVISOR) * _WIDTH_DIVISOR
        args = [c1, c2, *args[1:]]
        if module in _REPEATED_INSIDE:
            args.insert(2, repeats)
            repeats = 1
        return args, c2, repeats
    if module is common.Concat:
        return args, sum(widths[x] for x in f), repeats
    if module is Detect:
        args = [*args, [widths[x] for x in f]]
        if isinstance(args[1], int):  # a number of anchors per level: placeholders, to be fitted to the data
            args[1] = [list(range(args[1] * 2))] * len(f)
        return args, widths[-1], repeats
    return args, widths[f], repeats


def _module_class(name):
    if name not in _MODULES:
        raise YoloslimError(
            f"the model yaml uses {name}, which yoloslim's classic models do not implement; use one of "
            f"{', '.join(sorted(_MODULES))}"
        )
    return _MODULES[name]


def original_path(module: type) -> str:
    """The class path the original repository records in each layer's `type`, e.g. models.common.C3."""
    package = module.__module__
    if package.startswith("yoloslim."):
        package = package[len("yoloslim.") :]
    return f"{package}.{module.__qualname__}"


def _order_anchors_like_strides(head: Detect) -> None:
    """Reverse the anchor levels if their sizes grow the opposite way to the strides."""
    area = head.anchors.prod(-1).mean(-1).view(-1)
    area_step, stride_step = area[-1] - area[0], head.stride[-1] - head.stride[0]
    if area_step and area_step.sign() != stride_step.sign():
        head.anchors[:] = head.anchors.flip(0)


def _initialize_like_the_original(model: nn.Module) -> None:
    """BatchNorm eps and momentum, and in-place activations, as the original sets them after building."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.eps, m.momentum = 1e-3, 0.03
        elif type(m) in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU):
            m.inplace = True


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise YoloslimError(f"model yaml {path} does not exist; pass cfg as a dict or the path of a yolov5*.yaml")
    return yaml.safe_load(path.read_text(encoding="ascii", errors="ignore"))
