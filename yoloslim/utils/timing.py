"""Timing variants against each other so that their ratios mean something on a noisy machine: the one place every
stage that measures latency (profile, prune's check of a latency target, bench, the device benchmark) times with.

Variants are timed in the same run, alternating in rounds (each round times every variant for a few calls, in an
order that rotates), so drift in clock speed or background load hits them all alike. Thread counts are pinned by the
caller's backends and recorded with the results.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
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
    rounds_ms: list = field(default_factory=list, repr=False)  # each round's calls, for intervals over rounds

    @classmethod
    def from_rounds(cls, seconds: list) -> Latency:
        """From the calls' durations, one list per round."""
        rounds = np.asarray(seconds) * 1e3
        ms = rounds.ravel()
        return cls(
            float(ms.mean()),
            *(float(np.percentile(ms, q)) for q in (50, 90, 99)),
            float(1e3 / np.median(ms)),
            len(ms),
            rounds.tolist(),
        )

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "rounds_ms"}


def speedup_interval(reference: Latency, variant: Latency, resamples: int = 2000, seed: int = 0) -> tuple:
    """95% bootstrap interval of reference p50 / variant p50, resampling whole rounds, the same ones for both: a
    round times them back to back, so the drift it shares cancels."""
    ref, var = np.asarray(reference.rounds_ms), np.asarray(variant.rounds_ms)
    if ref.shape[0] != var.shape[0]:
        raise ValueError("speedup_interval needs two latencies from the same compare_latency run")
    picks = np.random.default_rng(seed).integers(0, len(ref), size=(resamples, len(ref)))
    ratios = np.median(ref[picks].reshape(resamples, -1), axis=1) / np.median(var[picks].reshape(resamples, -1), axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def compare_latency(
    variants: Dict[str, Callable[[], object]], rounds: int = 20, per_round: int = 5, warmup: int = 5
) -> Dict[str, Latency]:
    """Time each zero-argument callable `rounds * per_round` times, interleaved round by round."""
    names = list(variants)
    if not names:
        return {}
    for name in names:
        for _ in range(warmup):
            variants[name]()
    samples = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            call = variants[name]
            samples[name].append([])
            for _ in range(per_round):
                t0 = time.perf_counter()
                call()
                samples[name][-1].append(time.perf_counter() - t0)
    return {name: Latency.from_rounds(samples[name]) for name in names}
