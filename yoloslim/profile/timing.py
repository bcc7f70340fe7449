"""Timing a narrowed copy against the unpruned model, on the backend the model will run on.

Each variant is timed interleaved with the unpruned model (yoloslim.utils.timing.compare_latency), so the ratio of their
medians is what is recorded: drift of the clock or of background load between variants cancels.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from yoloslim.utils.timing import compare_latency

BACKENDS = ("onnxruntime", "tensorrt")


class OnnxRuntimeLoader:
    """ONNX Runtime sessions with the thread count pinned."""

    def __init__(self, threads: Optional[int]):
        self.threads = threads

    def __call__(self, onnx_path: Path):
        from yoloslim.runtime.backends import OnnxRuntimeBackend

        return OnnxRuntimeBackend(str(onnx_path), threads=self.threads)


class TensorRTLoader:
    """Engines built by yoloslim's engine builder on this device, one timing cache for all variants (beside them)."""

    def __init__(self, precision: str):
        self.precision = precision

    def __call__(self, onnx_path: Path):
        from yoloslim.runtime.cuda import load_cuda
        from yoloslim.runtime.tensorrt import TensorRTBackend, build_engine

        engine = build_engine(
            onnx_path,
            out=onnx_path.with_suffix(".engine"),
            precision=self.precision,
            timing_cache=onnx_path.parent / "timing.cache",
            device=load_cuda().device(),
        )
        return TensorRTBackend(engine)


def paired_ratio(variant, reference) -> float:
    """The median over rounds of each round's variant / unpruned median: both were timed back to back in a round, so
    load that comes and goes between rounds (other processes on the machine) cancels in each ratio."""
    per_round = np.median(np.asarray(variant.rounds_ms), axis=1) / np.median(np.asarray(reference.rounds_ms), axis=1)
    return float(np.median(per_round))


class Timer:
    """measure(onnx model, rounds) -> (variant ms, unpruned ms, variant / unpruned), the unpruned model loaded once."""

    def __init__(self, load: Callable, reference: Path, imgsz: int, per_round: int):
        self.load, self.per_round = load, per_round
        self.work = Path(tempfile.mkdtemp(prefix="yoloslim-profile-"))
        self.reference = load(reference)
        self.x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)

    def __call__(self, model, rounds: int) -> tuple:
        import onnx

        path = self.work / "variant.onnx"
        onnx.save(model, str(path))
        with self.load(path) as variant:
            timed = compare_latency(
                {"reference": lambda: self.reference(self.x), "variant": lambda: variant(self.x)},
                rounds=rounds,
                per_round=self.per_round,
                warmup=3,
            )
        return timed["variant"].p50_ms, timed["reference"].p50_ms, paired_ratio(timed["variant"], timed["reference"])

    def close(self) -> None:
        import shutil

        self.reference.close()
        shutil.rmtree(self.work, ignore_errors=True)
