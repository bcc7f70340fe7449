"""Latency and FPS of models, model alone and end to end, timed interleaved (yoloslim.utils.timing) with their
threads pinned and recorded; where each ONNX model's time goes, by operator."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np

from yoloslim.runtime.doctor import environment
from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.timing import compare_latency, speedup_interval

# Operators whose non-first inputs are a layer's learnt tensors (directly, or through a DequantizeLinear)
_WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization"}


def _file_stats(weights: Path, imgsz: int) -> dict:
    """Parameters and GFLOPs where they can be known without guessing; None reads as 'not measured'."""
    stats = {"size_mb": round(weights.stat().st_size / 1e6, 3), "params": None, "gflops": None}
    if weights.suffix == ".pt":
        from yoloslim.graph import model_stats
        from yoloslim.utils.checks import load_detection_checkpoint

        stats.update(model_stats(load_detection_checkpoint(weights, classic=True)[0].float(), imgsz))
    elif weights.suffix == ".onnx":
        try:
            import onnx
        except ImportError:
            return stats
        stats["params"] = _onnx_params(onnx.load(str(weights)).graph)
    return stats


def _onnx_params(graph) -> int:
    """The learnt tensors' elements: the initializers that weigh a layer, not the constants of the decode (grids,
    strides, anchors), whose size grows with the image size."""
    sizes = {t.name: int(np.prod(t.dims)) for t in graph.initializer}
    quantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    # a weight stored in int8, or kept in float behind a QuantizeLinear/DequantizeLinear pair
    dequantized = {
        n.output[0]: quantized.get(n.input[0], n.input[0]) for n in graph.node if n.op_type == "DequantizeLinear"
    }
    weights = {dequantized.get(name, name) for n in graph.node if n.op_type in _WEIGHTED_OPS for name in n.input[1:]}
    return sum(sizes[name] for name in weights if name in sizes)


def bench_thread_counts(threads: Optional[int]) -> list:
    """The thread counts a comparison times: 1, the figure CPUs and pruning tools are compared by (a second thread's
    gain depends on the CPU and shrinks as pruning shrinks each operator), then `threads` (default: all cores) where
    that is more."""
    import os

    count = threads or os.cpu_count() or 1
    return [1] if count == 1 else [1, count]


def bench(
    weights: list,
    imgsz: Optional[int] = None,
    batch: int = 1,
    threads: Optional[int] = None,
    image: Optional[Path] = None,
    data: Optional[Path] = None,
    rounds: int = 20,
    per_round: int = 5,
    more_threads: tuple = (),
    ops: bool = False,
) -> dict:
    """Model-only and end-to-end latency of each model at `threads`, all interleaved in one run; then, for each count
    in `more_threads`, the model alone in a run of its own (each result's "model_at", keyed by thread count; the
    environment lists them as "more_threads"); sizes and environment. The end-to-end timing decodes `image`, else the
    first validation image of `data` (default: the embedded dataset). With `ops`, each ONNX model's time by operator
    type at `threads` (its "operators", see operator_times; None for other backends)."""
    import os

    import cv2

    if threads is not None and threads < 1 or batch < 1:
        raise YoloslimError(f"threads {threads} and batch {batch}: give 1 or more (leave threads out for all cores)")
    threads = threads or os.cpu_count() or 1
    cv2.setNumThreads(threads)  # the end-to-end frame's decode and letterbox run at the pinned count too
    image = Path(image) if image else _sample_image(data)
    if cv2.imread(str(image)) is None:
        raise YoloslimError(f"cannot read the image {image}; give --source an image file OpenCV can open")
    paths = list(map(Path, weights))
    timed, info = _time_models(paths, imgsz, batch, threads, rounds, per_round, image)
    more = {n: _time_models(paths, imgsz, batch, n, rounds, per_round)[0] for n in more_threads}
    results = []
    first = timed[f"{paths[0]}|model"]
    for name, meta in info.items():
        model, e2e = timed[f"{name}|model"], timed[f"{name}|end_to_end"]
        results.append(
            {
                "weights": name,
                **meta,
                **_file_stats(Path(name), meta["imgsz"]),
                "batch": batch,
                "speedup": first.p50_ms / model.p50_ms,  # against the first model, timed in the same rounds
                "speedup_ci95": list(speedup_interval(first, model)),
                "model": model.as_dict(),
                "end_to_end": e2e.as_dict(),
                "fps_end_to_end": batch * e2e.fps,
                **({"model_at": {str(n): t[f"{name}|model"].as_dict() for n, t in more.items()}} if more else {}),
                **({"operators": _operators(Path(name), meta, threads, batch)} if ops else {}),
            }
        )
    env = {**environment(threads), **({"more_threads": list(more_threads)} if more_threads else {})}
    return {"results": results, "image": str(image), "environment": env}


def _time_models(
    paths: list,
    imgsz: Optional[int],
    batch: int,
    threads: int,
    rounds: int,
    per_round: int,
    image: Optional[Path] = None,
) -> tuple:
    """Every model loaded at `threads` and timed interleaved, alone and, given `image`, end to end: (timings keyed
    "<path>|model" and "<path>|end_to_end", each model's input size and backend)."""
    from contextlib import ExitStack
    from functools import partial

    from yoloslim.runtime.backends import load_backend

    variants, info = {}, {}
    with ExitStack() as loaded:  # TensorRT backends free their device buffers on the way out
        for path in paths:
            backend = loaded.enter_context(load_backend(path, threads=threads))
            size = backend.input_size(imgsz)
            x = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
            variants[f"{path}|model"] = partial(backend, x)
            if image is not None:
                variants[f"{path}|end_to_end"] = partial(end_to_end_frame, backend, image, batch, size)
            info[str(path)] = {"imgsz": size, "backend": type(backend).__name__}
        return compare_latency(variants, rounds=rounds, per_round=per_round), info


def operator_times(path: Path, threads: int, batch: int = 1, imgsz: int = 640, calls: int = 30) -> Dict[str, float]:
    """Where an ONNX model's latency goes: ONNX Runtime's own profile of `calls` runs (after one warm-up run), its
    kernels' times summed by operator type, in ms per call, largest first. Operator types are those of the graph
    ONNX Runtime runs after its fusions: a convolution with a fused ReLU reads as Conv, SiLU (never fused into the
    convolution) as QuickGelu. Profiling slows small kernels, so the sum can exceed the timed latency of a small
    model: compare shares and trends, not the last digit. Input: (batch, 3, imgsz, imgsz), the model's own size."""
    import json
    import tempfile

    import onnxruntime as ort

    from yoloslim.runtime.backends import session_options

    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((batch, 3, imgsz, imgsz), dtype=np.float32)
        feed = {session.get_inputs()[0].name: x}
        for _ in range(calls + 1):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    totals: Dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[1]:
            op = e["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + e["dur"] / 1e3 / calls
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def _operators(path: Path, meta: dict, threads: int, batch: int) -> Optional[Dict[str, float]]:
    return operator_times(path, threads, batch, meta["imgsz"]) if meta["backend"] == "OnnxRuntimeBackend" else None


def end_to_end_frame(backend, image: Path, batch: int, size: int):
    """One frame as an application sees it: decoded from its file, letterboxed, inferred, its detections kept."""
    import cv2

    from yoloslim.runtime.postprocess import postprocess
    from yoloslim.runtime.preprocess import preprocess

    tensor, boxes = preprocess([cv2.imread(str(image))] * batch, size)
    return postprocess(backend(tensor), boxes, end_to_end=backend.end_to_end)


def _sample_image(data: Optional[Path]) -> Path:
    """A validation image of the dataset, so end-to-end timing decodes a real photo."""
    from yoloslim.data import resolve_data, split_images

    return split_images(resolve_data(data), "val")[0][0]


def bench_table(report: dict) -> str:
    def fmt(v, spec):
        return "not measured" if v is None else format(v, spec)

    lines = [
        "| model | backend | imgsz | params | GFLOPs | MB | model p50 ms | p90 | p99 | speedup vs first (95% CI) "
        "| end-to-end p50 ms | FPS |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for i, r in enumerate(report["results"]):
        m, e = r["model"], r["end_to_end"]
        speedup = "" if i == 0 else "{:.2f}x ({:.2f}-{:.2f})".format(r["speedup"], *r["speedup_ci95"])
        lines.append(
            f"| {r['weights']} | {r['backend']} | {r['imgsz']} | {fmt(r['params'], ',')} | {fmt(r['gflops'], '.3f')} | "
            f"{r['size_mb']:.2f} | {m['p50_ms']:.2f} | {m['p90_ms']:.2f} | {m['p99_ms']:.2f} | {speedup} | "
            f"{e['p50_ms']:.2f} | {r['fps_end_to_end']:.1f} |"
        )
    lines += _operator_table(report["results"])
    env = report["environment"]
    lines.append(
        f"\n{env['cpu']}, {env['cores']} cores, {env['threads']} threads pinned; "
        f"TensorRT {env.get('TensorRT') or 'not installed'}"
    )
    return "\n".join(lines)


def _operator_table(results: list, rows: int = 8) -> list:
    """Markdown lines: ms per call and share of the profiled total for the operator types that take the most time in
    the first profiled model, the rest summed as "other"; none where no model was profiled."""
    profiled = [r for r in results if r.get("operators")]
    if not profiled:
        return []
    top = list(profiled[0]["operators"])[:rows]
    lines = [
        "\nTime by operator type (ONNX Runtime's profiler, which slows small kernels: compare shares), ms per call "
        "and share:\n",
        "| operator | " + " | ".join(Path(r["weights"]).name for r in profiled) + " |",
        "| --- |" + " ---: |" * len(profiled),
    ]
    for op in top + ["other", "total"]:
        cells = []
        for r in profiled:
            times, total = r["operators"], sum(r["operators"].values())
            ms = {"other": total - sum(times.get(t, 0.0) for t in top), "total": total}.get(op, times.get(op, 0.0))
            cells.append(f"{ms:.2f} ({ms / total:.0%})")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return lines
