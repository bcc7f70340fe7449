"""Which channels go: a global threshold on channel scores, per-layer guards, and widths rounded for TensorRT."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from yoloslim.config import PruneConfig


@dataclass
class GroupPlan:
    root: str
    size: int
    keep: list[int]  # group channel indices kept, most important first

    @property
    def removed(self) -> list[int]:
        kept = set(self.keep)
        return [i for i in range(self.size) if i not in kept]


def round_channels(count: int, size: int, round_to: int) -> int:
    """Round a kept width up to a multiple of round_to, within [round_to, size]; a layer narrower than round_to stays."""
    if size <= round_to:
        return size
    return min(size, max(round_to, math.ceil(count / round_to) * round_to))


def counts_above_threshold(scores: list[torch.Tensor], threshold: float) -> list[int]:
    return [int((s >= threshold).sum()) for s in scores]


def counts_above_ratio(scores: list[torch.Tensor], ratio: float) -> list[int]:
    """Per group, how many channels rank above the global `ratio` cut (ties broken by order, so the ratio holds
    even when many scores are equal, as in a model that was never sparsity-trained)."""
    everything = torch.cat(scores)
    order = torch.argsort(everything, stable=True)
    above = torch.ones(len(everything), dtype=torch.bool)
    above[order[: int(ratio * len(everything))]] = False
    return [int(part.sum()) for part in torch.split(above, [len(s) for s in scores])]


def cut_score(scores: list[torch.Tensor], ratio: float) -> float:
    """The score at the global `ratio` cut, for reports."""
    everything = torch.sort(torch.cat(scores)).values
    index = int(ratio * len(everything))
    return -math.inf if index == 0 else float(everything[index])


def plan_from_counts(
    roots: list[str], scores: list[torch.Tensor], above: list[int], config: PruneConfig
) -> list[GroupPlan]:
    """Keep each group's best channels: those above the cut, raised to min_keep, rounded up to round_to."""
    plans = []
    for root, s, count in zip(roots, scores, above):
        width = round_channels(max(count, math.ceil(config.min_keep * len(s)), 1), len(s), config.round_to)
        order = torch.argsort(s, descending=True, stable=True)
        plans.append(GroupPlan(root=root, size=len(s), keep=order[:width].tolist()))
    return plans


def removed_fraction(plans: list[GroupPlan]) -> float:
    return sum(len(p.removed) for p in plans) / max(sum(p.size for p in plans), 1)
