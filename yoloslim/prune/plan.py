"""Which channels go: a global threshold on channel scores, per-layer guards, and widths rounded for TensorRT."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from yoloslim.utils.errors import YoloslimError


@dataclass(frozen=True)
class PruneConfig:
    """How much to prune and how. Give at most one of ratio, threshold and target_flops (default: ratio 0.5)."""

    method: Literal["bn", "l1"] = "bn"  # bn: BatchNorm |gamma| (after sparsity training); l1: filter L1 norm
    ratio: Optional[float] = None  # fraction of prunable channels to remove, before rounding
    threshold: Optional[float] = None  # remove channels scoring below this (|gamma| for method bn)
    target_flops: Optional[float] = None  # fraction of the original GFLOPs to keep
    min_keep: float = 0.1  # per-layer minimum fraction of channels kept
    round_to: int = (
        8  # kept widths are multiples of this (8: FP16 tensor cores; 32: INT8 on Orin; 16: AVX-512 CPUs; 1: off)
    )
    compensate: bool = True  # fold removed channels' constant act(beta) into the consumers
    imgsz: int = 640  # image size at which GFLOPs are reported

    def __post_init__(self):
        given = [k for k in ("ratio", "threshold", "target_flops") if getattr(self, k) is not None]
        if len(given) > 1:
            raise YoloslimError(f"give only one of --ratio, --threshold and --target-flops, not {' and '.join(given)}")
        if self.method not in ("bn", "l1"):
            raise YoloslimError(f"unknown pruning criterion {self.method!r}; use bn or l1")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise YoloslimError(f"--ratio must lie in [0, 1), got {self.ratio}")
        if self.target_flops is not None and not 0 < self.target_flops <= 1:
            raise YoloslimError(f"--target-flops is the fraction of GFLOPs to keep, in (0, 1]; got {self.target_flops}")
        if self.threshold is not None and self.threshold < 0:
            raise YoloslimError(f"--threshold must be >= 0, got {self.threshold}")
        if not 0 <= self.min_keep <= 1:
            raise YoloslimError(f"--min-keep is a fraction of each layer's channels, in [0, 1]; got {self.min_keep}")
        if self.round_to < 1:
            raise YoloslimError(f"--round-to must be >= 1, got {self.round_to}")
        if (
            self.imgsz < 32 or self.imgsz % 32
        ):  # Ultralytics' GFLOPs count is 0 for other sizes, which would void --target-flops
            raise YoloslimError(f"--imgsz must be a multiple of 32 (the detector's largest stride), got {self.imgsz}")

    @property
    def effective_ratio(self) -> Optional[float]:
        return 0.5 if self.ratio is None and self.threshold is None and self.target_flops is None else self.ratio


@dataclass
class GroupPlan:
    root: str
    size: int
    keep: list[int]  # group channel indices kept, most important first (in each equal part)

    @property
    def removed(self) -> list[int]:
        kept = set(self.keep)
        return [i for i in range(self.size) if i not in kept]


def round_channels(count: int, size: int, round_to: int) -> int:
    """Round a kept width up to a multiple of round_to, within [round_to, size]; a layer that narrow stays whole."""
    if size <= round_to:
        return size
    return min(size, max(round_to, math.ceil(count / round_to) * round_to))


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
        best = [torch.argsort(s[part], descending=True, stable=True)[:width].tolist() for part in parts]
        keep = [part[i] for part, order in zip(parts, best) for i in order]
        plans.append(GroupPlan(root=group.root, size=len(s), keep=keep))
    return plans


def removed_fraction(plans: list[GroupPlan]) -> float:
    return sum(len(p.removed) for p in plans) / max(sum(p.size for p in plans), 1)
