"""Latency and FPS, measured so that ratios between variants mean something on a noisy machine.

Variants are timed in the same run, alternating in rounds (each round times every variant for a few calls, in an
order that rotates), so drift in clock speed or background load hits them all alike. Thread counts are pinned by the
caller's backends and recorded with the results.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict

import numpy as np


@dataclass
class Latency:
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    fps: float
    runs: int

    @classmethod
    def from_seconds(cls, seconds: list) -> "Latency":
        ms = np.asarray(seconds) * 1e3
        return cls(float(ms.mean()), *(float(np.percentile(ms, q)) for q in (50, 90, 99)), float(1e3 / np.median(ms)), len(ms))

    def as_dict(self) -> dict:
        return asdict(self)


def compare_latency(variants: Dict[str, Callable[[], object]], rounds: int = 20, per_round: int = 5, warmup: int = 5) -> Dict[str, Latency]:
    """Time each zero-argument callable `rounds * per_round` times, interleaved round by round."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    samples = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            call = variants[name]
            for _ in range(per_round):
                t0 = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - t0)
    return {name: Latency.from_seconds(samples[name]) for name in names}
