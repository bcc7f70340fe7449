"""What is coupled: torch-pruning's dependency graph over a detection model, and the model's size.

Below both sparsity training and pruning: model families add their coupling rules here and nowhere else, one
CouplingRule per module type in RULES. A model holding only module types that have a rule is accepted, whatever its
yaml calls itself (Ultralytics' YOLOv3u, YOLOv5u, YOLOv8, YOLO11 and YOLO26 detection models, P2 to P6, and the
original YOLOv5 repository's anchor-based models that yoloslim.models implements); anything else is refused with a
message naming the task or the modules. Ultralytics' module types are keyed by class name; yoloslim's classic ones by
the path the original repository gives them (models.common.C3, models.yolo.Detect), since several share a class name
with Ultralytics' (Conv, C3, Detect, DetectionModel) but not its layout.

A ChannelGroup is one set of output channels that must shrink together: a conv and its BatchNorm, plus every conv
joined to it by a residual add (Bottleneck, C3, C2f's chain of blocks, the residual SPPF), with the consumers' input
channels that follow, through concats and splits at the right offsets; a depthwise conv's input and output channels are
one set, so it joins the group of the channels it filters. The groups are enumerated in the model's module order, so
a split conv roots the group that holds all of its output channels.

How each module type is traced (its `trace`, a forward with the same result that torch-pruning follows correctly):

- C2f, C3k2 and C2PSA split their first conv's output in two halves (`chunk(2, 1)`, or `split((c, c), 1)`); one half
  goes straight to the closing concat, the other through the blocks (and, with shortcuts, their residual adds) and to
  the concat as well. torch-pruning 1.6 maps a split's outputs by the order in which it meets their consumers, not by
  which output each consumer took, so it couples the wrong channels when one half has several consumers; and it counts
  a slice as wide as its source when sizing a concat. These modules are therefore traced with one slice per half, and
  the concats of their traces are sized from the tensors themselves. Both halves are one group; since `chunk` and
  `split((c, c))` cut in the middle, the halves keep equal counts (`equal_parts`), and `c` is updated after pruning.
- The Detect head (one-to-many, and one-to-one for end-to-end heads) is traced down to its raw per-level maps: the
  flattening and level concat that follow would otherwise couple the outputs across levels, and the one-to-one branch
  detaches its inputs in training mode, which would hide from the tracer that it reads the neck's outputs. The final
  box and class convolutions of every branch (and the DFL) keep their output shapes; their inner convolutions,
  depthwise ones included, are prunable. Pruning a neck output removes it from every branch that reads it.
- Attention (C2PSA's PSABlock, and YOLO26's attention C3k2) keeps its inner widths, and so does the residual stream
  through it. Its output is reshaped to the stream's width (`view(B, C, H, W)` with C the input's channels), so the
  stream and the value channels must keep equal counts, and the query, key and value channels are viewed per head, so
  each can only shrink by the same count in every head; the consistent unit is a whole head. A nano model has two
  heads of 64 channels: pruning one removes half the block and 64 channels of the stream with it, a step far coarser
  than any other layer takes, for blocks that run at stride 32 only (C2PSA is 3 % of a YOLO11n's convolution work at
  640 px, YOLO26n's attention C3k2 6 %, their attention convolutions 0.7 % each). So the attention's convolutions
  are fixed, which fixes every channel coupled to them: the stream through the PSABlocks and, with it, the split
  conv's output of the C2PSA or C3k2 around them (both halves, as they keep equal counts). What stays prunable there:
  the feed-forward's hidden channels, the inner Bottleneck's hidden channels, and the block's output.

- The original repository's modules (Conv, Bottleneck with or without its shortcut, C3, BottleneckCSP, SPPF, SPP,
  Focus, Concat, nn.Upsample) trace as they run: torch-pruning follows their adds and whole-tensor concats as they
  are. BottleneckCSP's two plain convolutions meet in one BatchNorm after their concat, so each owns its half of that
  BatchNorm's channels; Focus's strided slices act on the image, whose channels stay. The anchor-based Detect head is
  traced down to its three output convolutions (the reshape and decoding that follow couple nothing): those keep
  their anchors x (5 + classes) outputs, and the neck channels feeding them are pruned like any other input.

Bias compensation (prune/apply.py) sees none of this: it works on each consuming conv's input, which a split or a
slice only selects, so it is as exact through a split as through a concat.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops

from yoloslim.models.yolo import DetectionModel as ClassicDetectionModel
from yoloslim.models.yolo import original_path
from yoloslim.utils.errors import YoloslimError

SUPPORTED_TABLE = "the supported models table in README.md"
# The modules yoloslim's quantization-aware finetuning puts in a model (yoloslim.export.fakequant)
_FAKE_QUANTIZATION = {"FakeQuant", "QuantConv", "QuantPSABlock"}


def _no_layers(module: nn.Module) -> list:
    return []


@dataclass(frozen=True)
class CouplingRule:
    """How one module type is traced, and what of it must stay."""

    trace: Callable | None = None  # (module, tracing, *inputs) -> the module's output, in ops torch-pruning maps right
    fixed: Callable[[nn.Module], list] = _no_layers  # layers whose output channels, and all coupled to them, stay
    equal_parts: Callable[[nn.Module], list] = _no_layers  # (conv, parts): its output is cut into equal parts
    refresh: Callable[[nn.Module], None] | None = None  # recompute attributes derived from widths, after pruning


class _Tracing:
    """What a traced forward records for the graph: the true input widths of the concats it makes."""

    def __init__(self):
        self.concat_sizes: dict = {}

    def cat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        out = torch.cat(parts, 1)
        self.concat_sizes[out.grad_fn] = [int(p.shape[1]) for p in parts]
        return out


def _halves(y: torch.Tensor) -> list[torch.Tensor]:
    half = y.shape[1] // 2
    return [y[:, :half], y[:, half:]]


def _c2f_trace(module, tracing: _Tracing, x):
    parts = _halves(module.cv1(x))
    parts.extend(block(parts[-1]) for block in module.m)
    return module.cv2(tracing.cat(parts))


def _c2psa_trace(module, tracing: _Tracing, x):
    kept, through = _halves(module.cv1(x))
    return module.cv2(tracing.cat([kept, module.m(through)]))


def _split_halves(module) -> list:
    return [(module.cv1.conv, 2)]


def _refresh_half_width(module) -> None:
    module.c = module.cv1.conv.out_channels // 2


def _head_branches(head) -> list:
    """(box convs, class convs) of each branch: one-to-many, then one-to-one for an end-to-end head."""
    branches = [(head.cv2, head.cv3)] if getattr(head, "cv2", None) is not None else []
    if getattr(head, "one2one_cv2", None) is not None:
        branches.append((head.one2one_cv2, head.one2one_cv3))
    return branches


def _detect_trace(head, tracing: _Tracing, x):
    return [convs[level](x[level]) for branch in _head_branches(head) for convs in branch for level in range(head.nl)]


def _detect_fixed(head) -> list:
    fixed = [convs[-1] for branch in _head_branches(head) for per_level in branch for convs in per_level]
    return [*fixed, head.dfl] if isinstance(head.dfl, nn.Module) else fixed


def _anchor_detect_trace(head, tracing: _Tracing, x):
    return [conv(feature) for conv, feature in zip(head.m, x)]


def _anchor_detect_fixed(head) -> list:
    return list(head.m)


def _refresh_layer_parameter_counts(model) -> None:
    """The original's model summary prints each layer's `np`, counted when it was built."""
    for layer in model.model:
        layer.np = sum(p.numel() for p in layer.parameters())


def _attention_fixed(attention) -> list:
    return [attention.qkv.conv, attention.pe.conv, attention.proj.conv]


_SPLIT_BLOCK = CouplingRule(trace=_c2f_trace, equal_parts=_split_halves, refresh=_refresh_half_width)

# Every module type whose coupling the tests check; the key is the class name, so a subclass needs its own entry.
RULES: dict[str, CouplingRule] = {
    **{
        name: CouplingRule()
        for name in (
            "DetectionModel",
            "Sequential",
            "ModuleList",
            "Identity",
            "Conv2d",
            "BatchNorm2d",
            "MaxPool2d",
            "Upsample",
            "Concat",
            "Conv",
            "DWConv",  # depthwise: torch-pruning couples its input and output channels
            "Bottleneck",
            "C3",
            "C3k",
            "SPPF",  # also YOLO26's residual SPPF: the add couples its output with its input
            "PSABlock",
            "DFL",
        )
    },
    "C2f": _SPLIT_BLOCK,
    "C3k2": _SPLIT_BLOCK,
    "C2PSA": CouplingRule(trace=_c2psa_trace, equal_parts=_split_halves, refresh=_refresh_half_width),
    "Attention": CouplingRule(fixed=_attention_fixed),
    "Detect": CouplingRule(trace=_detect_trace, fixed=_detect_fixed),
    # The original YOLOv5 repository's anchor-based models (yoloslim.models), keyed by their original paths.
    **{
        f"models.common.{name}": CouplingRule()
        for name in ("Conv", "Bottleneck", "C3", "BottleneckCSP", "SPPF", "SPP", "Focus", "Concat")
    },
    "models.yolo.Detect": CouplingRule(trace=_anchor_detect_trace, fixed=_anchor_detect_fixed),
    "models.yolo.DetectionModel": CouplingRule(refresh=_refresh_layer_parameter_counts),
}

# Heads of the tasks and families yoloslim does not prune, named in the refusal.
_OTHER_TASKS = {
    "Segment": "segmentation",
    "Segment26": "segmentation",
    "Pose": "pose",
    "Pose26": "pose",
    "OBB": "oriented-box (OBB)",
    "OBB26": "oriented-box (OBB)",
    "Classify": "classification",
    "RTDETRDecoder": "RT-DETR",
    "WorldDetect": "YOLO-World",
    "YOLOEDetect": "YOLOE",
    "YOLOESegment": "YOLOE",
    "YOLOESegment26": "YOLOE",
}


@dataclass
class ChannelGroup:
    """One prunable set of coupled output channels."""

    group: tp.Group  # full-index torch-pruning group
    root: str  # name of the conv the group is rooted at
    size: int  # channels in the group
    parts: list[list[int]] = field(default_factory=list)  # group indices of equal parts that keep equal counts

    def items(self):
        return self.group.items


def check_supported(model: nn.Module) -> None:
    """Refuse models whose coupling the tests do not cover: better a clear no than a broken checkpoint."""
    names = {rule_key(m) for m in model.modules()}
    heads = sorted(names & set(_OTHER_TASKS))
    if heads:
        found = f"this model's {heads[0]} head ({_OTHER_TASKS[heads[0]]}) is not one that yoloslim prunes"
    else:
        activations = {rule_key(m) for m in model.modules() if _is_activation(m)}
        unsupported = {n for n in names if n not in RULES} - activations
        unsupported |= {"grouped convolutions" for m in model.modules() if _is_grouped(m)}
        if not unsupported:
            return
        if unsupported & _FAKE_QUANTIZATION:
            raise YoloslimError(
                "this model was finetuned quantization-aware (its layers carry fake quantization); prune or sparsity-"
                "train the float model it came from, and finetune with --qat after"
            )
        found = f"this model has {', '.join(sorted(unsupported))}, which yoloslim cannot prune"
    raise YoloslimError(f"{found}; pass a detection model of a family in {SUPPORTED_TABLE}")


def check_unfused(model: nn.Module, needs: str, alternative: str = "") -> None:
    """Network Slimming reads each channel's BatchNorm gamma; a fused model (Ultralytics folds BatchNorm into the
    convolutions before it predicts or exports) has none, and every channel would score the same."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise YoloslimError(
            f"this model is fused (its BatchNorm layers were folded into the convolutions), so {needs}; pass the "
            f"checkpoint its training wrote (best.pt or last.pt){alternative}"
        )


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__ == nn.modules.activation.__name__


def _is_grouped(module: nn.Module) -> bool:
    """A grouped conv that is not depthwise (whose groups torch-pruning would have to keep whole)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups != module.out_channels


def rule_key(module: nn.Module) -> str:
    """The module's entry in RULES: its class name, or for yoloslim's classic modules their original path."""
    cls = type(module)
    return original_path(cls) if cls.__module__.startswith("yoloslim.models.") else cls.__name__


def _rules(model: nn.Module):
    """(module, its rule) for every module of the model."""
    keyed = [(m, rule_key(m)) for m in model.modules()]
    return [(m, RULES[key]) for m, key in keyed if key in RULES]


def fixed_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose output channels stay, with every channel coupled to them."""
    return [layer for module, rule in _rules(model) for layer in rule.fixed(module)]


def _traced_sum(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    return sum(t.float().sum() for t in _tensors(out))


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    return [t for v in values for t in _tensors(v)]


def _trace_graph(model: nn.Module, imgsz: int) -> tp.DependencyGraph:
    """torch-pruning's graph, traced through each module's rule (its own forward where it has none)."""
    tracing = _Tracing()
    traced = [(m, rule.trace, m.__dict__.get("forward")) for m, rule in _rules(model) if rule.trace is not None]
    for module, trace, _ in traced:  # an instance attribute shadows the class's forward until it is restored
        module.forward = partial(trace, module, tracing)
    try:
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=torch.zeros(1, 3, imgsz, imgsz), forward_fn=_traced_sum, verbose=False
        )
    finally:
        for module, _, own in traced:
            if own is None:
                del module.forward
            else:
                module.forward = own
    _size_recorded_concats(graph, tracing.concat_sizes)
    return graph


def _size_recorded_concats(graph: tp.DependencyGraph, sizes: dict) -> None:
    """Give the concats that a trace recorded their true input widths; torch-pruning rebuilds its index mappings
    from them before each group it forms, and keeps them up to date as it prunes."""
    for node in graph.module2node.values():
        if node.type == ops.OPTYPE.CONCAT and node.grad_fn in sizes:
            if len(node.inputs) != len(sizes[node.grad_fn]):  # one node per input is what the offsets rely on
                raise RuntimeError(f"a traced concat has {len(node.inputs)} distinct inputs for {sizes[node.grad_fn]}")
            node.module.concat_sizes = list(sizes[node.grad_fn])


def build_graph(model: nn.Module, imgsz: int = 64) -> tuple[tp.DependencyGraph, list[ChannelGroup]]:
    """Trace `model` (float32, CPU) and return the graph and every prunable channel group, in module order."""
    check_supported(model)
    for p in model.parameters():
        p.requires_grad_(True)  # tracing relies on autograd; loaded checkpoints have it switched off
    graph = _trace_graph(model, imgsz)
    names = {m: n for n, m in model.named_modules()}
    fixed = set(fixed_layers(model))
    splits = {conv: parts for module, rule in _rules(model) for conv, parts in rule.equal_parts(module)}
    groups, visited = [], set()
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        if conv in visited or conv in fixed or conv not in graph.module2node:
            continue
        prune_out = graph.get_pruner_of_module(conv).prune_out_channels
        group = graph.get_pruning_group(conv, prune_out, list(range(conv.out_channels)))
        producers = {i.dep.target.module for i in group.items if graph.is_out_channel_pruning_fn(i.dep.handler)}
        visited |= producers
        if producers & fixed:
            continue
        channels = ChannelGroup(group=group, root=names[conv], size=conv.out_channels)
        channels.parts = _equal_parts(graph, channels, splits)
        groups.append(channels)
    return graph, groups


def _equal_parts(graph: tp.DependencyGraph, group: ChannelGroup, splits: dict) -> list[list[int]]:
    """The group indices of each equal part of the split conv in the group, or [] if it holds none."""
    found = [(conv, idxs, roots) for conv, idxs, roots in group_out_convs(graph, group) if conv in splits]
    if not found:
        return []
    if len(found) > 1 or len(found[0][1]) != found[0][0].out_channels:
        raise RuntimeError(f"group {group.root} does not hold exactly one split conv with all of its channels")
    conv, idxs, roots = found[0]
    width = conv.out_channels // splits[conv]
    return [[r for i, r in zip(idxs, roots) if i // width == part] for part in range(splits[conv])]


def prunable_batchnorms(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """(name, BatchNorm) of every BatchNorm whose channels a prune can remove, in module order: the ones sparsity
    training should push towards zero. Traced on a copy, so `model` is left as it is."""
    copy = deepcopy(model).float().cpu().eval()
    graph, groups = build_graph(copy)
    names = {m: n for n, m in copy.named_modules()}
    prunable = {names[bn] for group in groups for bn, _, _ in group_batchnorms(graph, group)}
    return [(n, m) for n, m in model.named_modules() if n in prunable]


def refresh_widths(model: nn.Module) -> None:
    """After pruning: update the attributes that modules derive from their widths (C2f's and C2PSA's `c`)."""
    for module, rule in _rules(model):
        if rule.refresh is not None:
            rule.refresh(module)


def _group_layers(graph: tp.DependencyGraph, group: ChannelGroup, kind: type, outputs: bool):
    """(layer, its channel indices, the matching group channel indices) for each `kind` layer whose output
    (or, with outputs=False, input) channels the group holds."""
    on_side = graph.is_out_channel_pruning_fn if outputs else graph.is_in_channel_pruning_fn
    for item in group.items():
        module = item.dep.target.module
        if isinstance(module, kind) and on_side(item.dep.handler):
            yield module, list(item.idxs), list(item.root_idxs)


def group_batchnorms(graph: tp.DependencyGraph, group: ChannelGroup):
    return _group_layers(graph, group, nn.BatchNorm2d, outputs=True)


def group_out_convs(graph: tp.DependencyGraph, group: ChannelGroup):
    """The convolutions producing the group's channels."""
    return _group_layers(graph, group, nn.Conv2d, outputs=True)


def group_in_convs(graph: tp.DependencyGraph, group: ChannelGroup):
    """The convolutions consuming the group's channels."""
    return _group_layers(graph, group, nn.Conv2d, outputs=False)


def has_one_to_one_branch(model: nn.Module) -> bool:
    """Whether the head has an NMS-free one-to-one branch (YOLO26, YOLOv10). yoloslim deploys, evaluates and counts
    that branch, what the end-to-end design is for; Ultralytics selects it only when told (end2end, or nms=False), its
    default being the one-to-many branch with an external NMS."""
    return getattr(model.model[-1], "one2one_cv2", None) is not None


def undeployed_modules(model: nn.Module) -> set:
    """The modules a deployed model does not run: an end-to-end head's one-to-many branch (its cv2 and cv3), which
    the export drops. Training still uses that branch, so pruning keeps it consistent; only latency ignores it."""
    if not has_one_to_one_branch(model):
        return set()
    head = model.model[-1]  # a fused head has dropped the branch already (None)
    return {module for branch in (head.cv2, head.cv3) if branch is not None for module in branch.modules()}


def model_stats(model: nn.Module, imgsz: int) -> dict:
    """Parameters (all the checkpoint holds) and GFLOPs at `imgsz` (Ultralytics' own count, so figures match its
    model summary). In PyTorch an end-to-end head runs both branches, but a deployed model keeps one (Ultralytics'
    fuse drops the other): only the one-to-one branch, the one yoloslim exports, is counted."""
    from ultralytics.utils.torch_utils import get_flops

    counted = model
    if has_one_to_one_branch(model):
        counted = deepcopy(model)
        counted.model[-1].end2end = True
        counted.model[-1].fuse()
    gflops = _classic_gflops(model, imgsz) if isinstance(model, ClassicDetectionModel) else get_flops(counted, imgsz)
    return {"params": sum(p.numel() for p in model.parameters()), "gflops": round(float(gflops), 4)}


def _classic_gflops(model: ClassicDetectionModel, imgsz: int) -> float:
    """Ultralytics' count (thop, extrapolated from stride-sized images) on an image of the yaml's channels: Ultralytics
    takes them from the first weight, which a Focus stem (four pixel phases stacked) has four times over."""
    import thop

    image = torch.empty(1, model.yaml["ch"], imgsz, imgsz)
    stride = max(int(model.stride.max()), 32)
    return thop.profile(model, inputs=[image], stride=stride, verbose=False)[0] / 1e9 * 2


def conv_widths(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
