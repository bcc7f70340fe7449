"""Widths a prune can give a group, and the plans the profiler times. Torch-free: the device profiles with these."""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np


def round_channels(count: int, size: int, round_to: int) -> int:
    """Round a kept width up to a multiple of round_to, within [round_to, size]; a layer that narrow stays whole."""
    if size <= round_to:
        return size
    return min(size, max(round_to, math.ceil(count / round_to) * round_to))


def allowed_widths(size: int, round_to: int, min_keep: float = 0.0) -> List[int]:
    """Every width a group of `size` channels per section can keep, narrowest first."""
    lowest = round_channels(max(math.ceil(min_keep * size), 1), size, round_to)
    return sorted({round_channels(w, size, round_to) for w in range(lowest, size + 1)})


def uniform_plan(sizes: Dict[str, int], fraction: float, round_to: int) -> Dict[str, int]:
    """Every group at `fraction` of its width, rounded up to round_to."""
    return {root: round_channels(math.ceil(fraction * size), size, round_to) for root, size in sizes.items()}


def sweep_widths(size: int, round_to: int, count: int) -> List[int]:
    """`count` widths spread over the group's range (a fifth to four fifths), at the rounding; the full width is the
    unpruned model."""
    fractions = np.linspace(0.2, 0.8, count) if count > 1 else [0.5]
    return sorted({round_channels(math.ceil(f * size), size, round_to) for f in fractions} - {size})


def random_plans(sizes: Dict[str, int], round_to: int, count: int, seed: int) -> List[Dict[str, int]]:
    """Plans with an overall kept fraction between 0.25 and 0.9 and each group scattered around it, as a prune by a
    global threshold leaves them."""
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(count):
        overall = rng.uniform(0.25, 0.9)
        fractions = np.clip(overall * np.exp(rng.normal(0, 0.35, len(sizes))), 0.1, 1.0)
        plans.append({r: round_channels(math.ceil(f * s), s, round_to) for (r, s), f in zip(sizes.items(), fractions)})
    return plans


def changed(plan: Dict[str, int], sizes: Dict[str, int]) -> Dict[str, int]:
    """The groups a plan narrows (what a table stores of it)."""
    return {root: int(w) for root, w in plan.items() if w != sizes[root]}


def best_multiple(probes: Dict[int, Sequence[float]], tolerance: float = 0.03) -> int:
    """The smallest rounding multiple whose probe ran within `tolerance` of the best latency per unit of work.

    probes: multiple -> (measured latency fraction, work fraction) of the same prune rounded to that multiple. A
    multiple the backend's kernels do not take (channel blocks of 16 in ONNX Runtime's AVX-512 kernels, 8 or 32 in
    TensorRT's FP16 or INT8 tactics) pays for layout conversions and padding, so it runs slower per operation.
    """
    cost = {m: ratio / work for m, (ratio, work) in probes.items()}
    best = min(cost.values())
    return min(m for m, c in cost.items() if c <= best * (1 + tolerance))
