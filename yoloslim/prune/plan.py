"""Which channels go: a global threshold on channel scores, per-layer guards, and widths rounded for TensorRT."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from yoloslim.config import PruneConfig
from yoloslim.profile.plans import round_channels


@dataclass
class GroupPlan:
    root: str
    size: int
    keep: list[int]  # group channel indices kept, most important first (in each equal part)

    @property
    def removed(self) -> list[int]:
        kept = set(self.keep)
        return [i for i in range(self.size) if i not in kept]


def above_threshold(scores: list[torch.Tensor], threshold: float) -> list[torch.Tensor]:
    """Per group, which channels score at least `threshold`."""
    return [s >= threshold for s in scores]


def above_ratio(scores: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """Per group, which channels rank above the global `ratio` cut (ties broken by order, so the ratio holds even when
    many scores are equal, as in a model that was never sparsity-trained)."""
    everything = torch.cat(scores)
    order = torch.argsort(everything, stable=True)
    above = torch.ones(len(everything), dtype=torch.bool)
    above[order[: int(ratio * len(everything))]] = False
    return list(torch.split(above, [len(s) for s in scores]))


def cut_score(scores: list[torch.Tensor], ratio: float) -> float:
    """The score at the global `ratio` cut, for reports."""
    everything = torch.sort(torch.cat(scores)).values
    index = int(ratio * len(everything))
    return -math.inf if index == 0 else float(everything[index])


def plan_groups(
    groups: list, scores: list[torch.Tensor], above: list[torch.Tensor], config: PruneConfig
) -> list[GroupPlan]:
    """Keep each group's best channels: those above the cut, raised to min_keep, rounded up to round_to.

    A group whose channels are cut into equal parts (a split conv's halves) keeps the same count in each part, the
    largest any part needs, so no channel above the cut goes; the guards apply per part.
    """
    plans = []
    for group, s, mask in zip(groups, scores, above):
        parts = group.parts or [list(range(len(s)))]
        size = len(parts[0])
        count = max(int(mask[part].sum()) for part in parts)
        width = round_channels(max(count, math.ceil(config.min_keep * size), 1), size, config.round_to)
        plans.append(keep_best(group, s, width))
    return plans


def keep_best(group, scores: torch.Tensor, width: int) -> GroupPlan:
    """The group's `width` best channels of each equal part (of the whole group if it has none)."""
    parts = group.parts or [list(range(len(scores)))]
    best = [torch.argsort(scores[part], descending=True, stable=True)[:width].tolist() for part in parts]
    return GroupPlan(
        root=group.root, size=len(scores), keep=[part[i] for part, order in zip(parts, best) for i in order]
    )


def removed_fraction(plans: list[GroupPlan]) -> float:
    return sum(len(p.removed) for p in plans) / max(sum(p.size for p in plans), 1)
