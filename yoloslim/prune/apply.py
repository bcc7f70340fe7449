"""Applying a plan: physical removal through the dependency graph, and bias compensation."""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn

from yoloslim.prune.graph import ChannelGroup, group_batchnorms, group_in_convs
from yoloslim.prune.plan import GroupPlan


def removed_batchnorm_channels(graph, groups: list[ChannelGroup], plans: list[GroupPlan]) -> dict[nn.BatchNorm2d, list[int]]:
    """Every BatchNorm channel that the plan removes, coupled ones included."""
    removed = defaultdict(list)
    for group, plan in zip(groups, plans):
        gone = set(plan.removed)
        for bn, idxs, roots in group_batchnorms(graph, group):
            removed[bn] += [i for i, r in zip(idxs, roots) if r in gone]
    return removed


@contextmanager
def zeroed_gammas(channels: dict[nn.BatchNorm2d, list[int]], also_beta: bool = False):
    """Temporarily set the listed channels' gamma (and beta) to zero: the model that pruning should reproduce."""
    saved = {bn: (bn.weight.detach().clone(), bn.bias.detach().clone()) for bn in channels}
    with torch.no_grad():
        for bn, idxs in channels.items():
            bn.weight[idxs] = 0
            if also_beta:
                bn.bias[idxs] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for bn, (weight, bias) in saved.items():
                bn.weight.copy_(weight)
                bn.bias.copy_(bias)


@torch.no_grad()
def removed_input_contributions(model, graph, groups, plans, imgsz: int = 64) -> dict[nn.Conv2d, torch.Tensor]:
    """What each consuming conv received from the removed channels, per output channel, in the zero-gamma model.

    A channel whose gamma is zero leaves its BatchNorm as the constant beta, so act(beta) flows on through upsampling,
    max-pooling, concats and residual sums as a spatially constant map (a sum of such constants where branches meet).
    Its value is read at each consumer's input; the consumer's response to it is that value times the filter's spatial
    sum (exact on interior pixels; zero padding changes the border).
    """
    removed_inputs = defaultdict(list)
    for group, plan in zip(groups, plans):
        gone = set(plan.removed)
        for conv, idxs, roots in group_in_convs(graph, group):
            if conv.groups == 1:  # a depthwise conv loses its output channel together with its input
                removed_inputs[conv] += [i for i, r in zip(idxs, roots) if r in gone]
    if not removed_inputs:
        return {}
    seen = {}
    hooks = [conv.register_forward_hook(lambda m, args, out: seen.__setitem__(m, args[0])) for conv in removed_inputs]
    try:
        with zeroed_gammas(removed_batchnorm_channels(graph, groups, plans)):
            model.eval()(torch.rand(1, 3, imgsz, imgsz))
    finally:
        for hook in hooks:
            hook.remove()
    contributions = {}
    for conv, idxs in removed_inputs.items():
        x = seen[conv]
        values = x[0, idxs, x.shape[2] // 2, x.shape[3] // 2]
        contributions[conv] = conv.weight[:, idxs].sum((2, 3)).float() @ values.float()
    return contributions


@torch.no_grad()
def fold_removed_channel_bias(model: nn.Module, contributions: dict[nn.Conv2d, torch.Tensor]) -> None:
    """Add back what the removed channels contributed: into the following BatchNorm's running mean, or the conv bias."""
    batchnorm_after = {m.conv: m.bn for m in model.modules() if isinstance(getattr(m, "conv", None), nn.Conv2d) and isinstance(getattr(m, "bn", None), nn.BatchNorm2d)}
    for conv, delta in contributions.items():
        if conv in batchnorm_after:
            batchnorm_after[conv].running_mean -= delta.to(batchnorm_after[conv].running_mean)  # BN saw input + delta before
        elif conv.bias is not None:
            conv.bias += delta.to(conv.bias)
        else:
            conv.bias = nn.Parameter(delta.to(conv.weight))


def apply_plan(model: nn.Module, graph, groups: list[ChannelGroup], plans: list[GroupPlan], compensate: bool) -> None:
    """Remove the planned channels from `model` in place, keeping adds, concats and the head consistent."""
    if compensate:  # folded before removal, so the consumers' own pruning slices the corrected statistics too
        fold_removed_channel_bias(model, removed_input_contributions(model, graph, groups, plans))
    for group, plan in zip(groups, plans):
        if plan.removed:
            root = group.group[0].dep
            graph.get_pruning_group(root.target.module, root.handler, plan.removed).prune()
