"""Applying a plan: physical removal through the dependency graph, and bias compensation."""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn

from yoloslim.graph import ChannelGroup, group_batchnorms, group_in_convs, refresh_widths
from yoloslim.prune.plan import GroupPlan


def removed_batchnorm_channels(
    graph, groups: list[ChannelGroup], plans: list[GroupPlan]
) -> dict[nn.BatchNorm2d, list[int]]:
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


def _removed_inputs(graph, groups, plans) -> dict[nn.Conv2d, list[int]]:
    """consuming conv -> the input channels the plan removes from it."""
    removed_inputs = defaultdict(list)
    for group, plan in zip(groups, plans):
        gone = set(plan.removed)
        for conv, idxs, roots in group_in_convs(graph, group):
            if conv.groups == 1:  # a depthwise conv loses its output channel together with its input
                removed_inputs[conv] += [i for i, r in zip(idxs, roots) if r in gone]
    return {conv: idxs for conv, idxs in removed_inputs.items() if idxs}


def _constant_carrier(x: torch.Tensor, removed: list[int], tolerance: float = 1e-3) -> int | None:
    """The kept input channel closest to a nonzero constant map (its gamma is zero or nearly), or None.

    A carrier whose map varies by a fraction f of its mean spreads an error of f times the moved contribution over the
    whole map, against an error of the whole contribution at the borders when it is folded into the bias instead.
    """
    flat = x.flatten(1)
    mean = flat.mean(1)
    spread = (flat.amax(1) - flat.amin(1)) / mean.abs().clamp_min(1e-12)
    spread[removed] = math.inf
    spread[mean.abs() <= 1e-3] = math.inf
    best = int(spread.argmin())
    return best if float(spread[best]) <= tolerance else None


@torch.no_grad()
def compensate_removed_inputs(model, graph, groups, plans) -> None:
    """Give each consuming conv back what the removed channels fed it in the zero-gamma model.

    A channel whose gamma is zero leaves its BatchNorm as the constant beta, so act(beta) flows on through upsampling,
    max-pooling, concats and residual sums as a spatially constant map (a sum of such constants where branches meet).
    Where a kept input channel is such a constant too (a zero-gamma channel kept by rounding), the removed constants
    move onto its weights tap by tap, exact at the borders too (both maps meet the same zero padding). Otherwise
    the consumer's response (value times the filter's spatial sum) is folded into its following BatchNorm's running
    mean or its bias: exact on interior pixels only. The probe image makes the deepest maps 16 pixels wide, more than
    SPPF's three chained 5x5 poolings reach (13): on a narrower map the last poolings return each channel's global
    maximum everywhere, so every pooled channel would look constant and could be picked as a carrier.
    """
    removed_inputs = _removed_inputs(graph, groups, plans)
    if not removed_inputs:
        return
    seen = {}
    hooks = [
        conv.register_forward_hook(lambda m, args, out: seen.__setitem__(m, args[0][0])) for conv in removed_inputs
    ]
    try:
        with zeroed_gammas(removed_batchnorm_channels(graph, groups, plans)):
            imgsz = 16 * int(max(model.stride))
            model.eval()(torch.rand(1, 3, imgsz, imgsz))
    finally:
        for hook in hooks:
            hook.remove()
    biases = {}
    for conv, idxs in removed_inputs.items():
        x = seen[conv].float()
        values = x[idxs, x.shape[1] // 2, x.shape[2] // 2]
        carrier = _constant_carrier(x, idxs)
        if carrier is None:
            biases[conv] = conv.weight[:, idxs].sum((2, 3)).float() @ values
        else:
            moved = (conv.weight[:, idxs].float() * values[None, :, None, None]).sum(1) / x[carrier].mean()
            conv.weight[:, carrier] += moved.to(conv.weight)
    fold_into_bias(model, biases)


@torch.no_grad()
def fold_into_bias(model: nn.Module, contributions: dict[nn.Conv2d, torch.Tensor]) -> None:
    """Add a constant to each conv's output: into the following BatchNorm's running mean, or the conv bias."""
    batchnorm_after = {
        m.conv: m.bn
        for m in model.modules()
        if isinstance(getattr(m, "conv", None), nn.Conv2d) and isinstance(getattr(m, "bn", None), nn.BatchNorm2d)
    }
    for conv, delta in contributions.items():
        if conv in batchnorm_after:
            batchnorm_after[conv].running_mean -= delta.to(
                batchnorm_after[conv].running_mean
            )  # BN saw input + delta before
        elif conv.bias is not None:
            conv.bias += delta.to(conv.bias)
        else:
            conv.bias = nn.Parameter(delta.to(conv.weight))


def apply_plan(model: nn.Module, graph, groups: list[ChannelGroup], plans: list[GroupPlan], compensate: bool) -> None:
    """Remove the planned channels from `model` in place, keeping adds, concats and the head consistent."""
    if compensate:  # folded before removal, so the consumers' own pruning slices the corrected statistics too
        compensate_removed_inputs(model, graph, groups, plans)
    for group, plan in zip(groups, plans):
        if plan.removed:
            root = group.group[0].dep
            graph.get_pruning_group(root.target.module, root.handler, plan.removed).prune()
    refresh_widths(model)
