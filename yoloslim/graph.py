"""What is coupled: torch-pruning's dependency graph over an Ultralytics detection model, and the model's size.

Below both sparsity training and pruning: model families add their coupling rules here and nowhere else.

A ChannelGroup is one set of output channels that must shrink together: a conv and its BatchNorm, plus every conv
joined to it by a residual add (Bottleneck, C3), with the consumers' input channels that follow, through concats
(C3, SPPF, the neck's Concat layers) at the right offsets. The graph is traced with the Detect head in training mode,
whose forward stops at the raw per-level maps: the box decoding and DFL that follow would otherwise couple the head's
outputs across levels. The head's final box and class convolutions (and the DFL) keep their output shapes; its inner
convolutions are prunable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from yoloslim.utils.errors import YoloslimError

# The modules of Ultralytics' YOLOv5 family (yolov5*.yaml, P6 included), the ones whose coupling the tests check.
# Anything else (C2f and C3k2 splits, attention, ghost and depthwise convs, transposed convs) is refused.
_SUPPORTED_MODULES = {
    "DetectionModel",
    "Sequential",
    "ModuleList",
    "Identity",
    "Conv",
    "Conv2d",
    "BatchNorm2d",
    "C3",
    "Bottleneck",
    "SPPF",
    "MaxPool2d",
    "Upsample",
    "Concat",
    "Detect",
    "DFL",
}


@dataclass
class ChannelGroup:
    """One prunable set of coupled output channels."""

    group: tp.Group  # full-index torch-pruning group
    root: str  # name of the conv the group is rooted at
    size: int  # channels in the group

    def items(self):
        return self.group.items


def check_supported(model: nn.Module) -> None:
    """Refuse model families whose coupling has not been validated: better a clear no than a broken checkpoint."""
    unsupported = {
        type(m).__name__
        for m in model.modules()
        if type(m).__name__ not in _SUPPORTED_MODULES and not _is_activation(m)
    }
    unsupported |= {"grouped convolutions" for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    if getattr(model.model[-1], "one2one_cv2", None) is not None:
        unsupported.add("an end-to-end (NMS-free) head")
    if unsupported:
        found = ", ".join(sorted(unsupported))
        raise YoloslimError(
            f"this model has {found}, which yoloslim prune does not support yet (YOLOv8, YOLO11 and later families are "
            "among them); pass a model of Ultralytics' YOLOv5 family (yolov5*.yaml)"
        )


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__ == nn.modules.activation.__name__


def fixed_head_layers(model: nn.Module) -> list[nn.Module]:
    """The Detect head layers whose output shapes are fixed by the decoding: final box/class convs and the DFL."""
    head = model.model[-1]
    fixed = [branch[-1] for branch in (*head.cv2, *head.cv3)]
    if hasattr(head, "dfl") and isinstance(head.dfl, nn.Module):
        fixed.append(head.dfl)
    return fixed


def _raw_head_forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    # Detect returns its raw per-level maps when its own flag says training; its BatchNorms stay in eval mode, so
    # tracing leaves their running statistics alone.
    head = model.model[-1]
    head.training = True
    try:
        out = model(images)
    finally:
        head.training = False
    parts = out.values() if isinstance(out, dict) else out
    return sum(t.float().sum() for t in parts if isinstance(t, torch.Tensor))


def build_graph(model: nn.Module, imgsz: int = 64) -> tuple[tp.DependencyGraph, list[ChannelGroup]]:
    """Trace `model` (float32, CPU) and return the graph and every prunable channel group."""
    check_supported(model)
    for p in model.parameters():
        p.requires_grad_(True)  # tracing relies on autograd; loaded checkpoints have it switched off
    example = torch.zeros(1, 3, imgsz, imgsz)
    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=example, forward_fn=_raw_head_forward, verbose=False
    )
    names = {m: n for n, m in model.named_modules()}
    fixed = fixed_head_layers(model)
    groups = [
        ChannelGroup(group=g, root=names[g[0].dep.target.module], size=len(g[0].idxs))
        for g in graph.get_all_groups(ignored_layers=fixed, root_module_types=[nn.Conv2d])
    ]
    return graph, groups


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


def model_stats(model: nn.Module, imgsz: int) -> dict:
    """Parameters and GFLOPs at `imgsz` (Ultralytics' own count, so figures match its model summary)."""
    from ultralytics.utils.torch_utils import get_flops

    return {"params": sum(p.numel() for p in model.parameters()), "gflops": round(float(get_flops(model, imgsz)), 4)}


def conv_widths(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
