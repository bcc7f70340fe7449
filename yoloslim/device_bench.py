"""The on-device benchmark behind `yoloslim doctor --benchmark`: build TensorRT engines of ONNX files on this device,
check each engine's output against a reference, time it (model alone and end to end) and evaluate its mAP beside ONNX
Runtime's on the CPU, into one report to keep or send. Torch-free, like the runtime it drives."""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from yoloslim.bench import end_to_end_frame
from yoloslim.evaluate import predict_records, summarise
from yoloslim.runtime.doctor import (
    ASSETS,
    SELFTEST_ONNX,
    build_engines,
    check_output,
    check_verdict,
    environment,
    gpu_clocks,
    onnx_precision,
)
from yoloslim.utils.errors import YoloslimError


def _reference(onnx: Path, image_input: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray], str]:
    """(input, reference output, where it comes from) for an output check: a shipped self-test ONNX has its stored
    input and output; any other ONNX is run by ONNX Runtime on a dataset image, where ONNX Runtime is installed."""
    if onnx.resolve().parent == ASSETS.resolve() and onnx.name in SELFTEST_ONNX:
        stored = np.load(ASSETS / "selftest.npz")
        return stored["images"], stored[onnx_precision(onnx)], "stored ONNX Runtime output"
    if importlib.util.find_spec("onnxruntime") is None:
        return image_input, None, "not checked: onnxruntime is not installed"
    from yoloslim.runtime.backends import OnnxRuntimeBackend

    return image_input, OnnxRuntimeBackend(str(onnx))(image_input), "ONNX Runtime on a dataset image"


def device_benchmark(
    onnx_files: Sequence = (), data=None, rounds: int = 20, per_round: int = 5, bootstrap: int = 1000
) -> dict:
    """Build, check, time and evaluate the engines of `onnx_files` (default: the shipped self-test ONNX files)."""
    import cv2

    from yoloslim.data import resolve_data, split_images
    from yoloslim.runtime.cuda import describe, load_cuda
    from yoloslim.runtime.preprocess import preprocess
    from yoloslim.runtime.tensorrt import import_tensorrt, version_tuple
    from yoloslim.utils.timing import compare_latency

    trt = import_tensorrt()
    onnx_files = [Path(p) for p in onnx_files] or [ASSETS / name for name in SELFTEST_ONNX]
    for onnx in onnx_files:
        if not onnx.is_file():
            raise YoloslimError(f"ONNX file {onnx} does not exist; pass --onnx files written by yoloslim export")
    data_yaml = resolve_data(data)
    images, names = split_images(data_yaml, "val")
    if not images:
        raise YoloslimError(f"{data_yaml} has no validation images; pass --data with a dataset that has a val split")
    cuda = load_cuda()
    device = cuda.device()
    with tempfile.TemporaryDirectory() as tmp:
        rows = build_engines(onnx_files, Path(tmp), version_tuple(trt.__version__)[0], device)
        with ExitStack() as loaded:  # every engine's buffers freed on the way out, also when a later one fails to load
            backends = _load_engines(rows, cuda, loaded)
            frame = cv2.imread(str(images[0]))
            for i, backend in backends.items():
                x, want, source = _reference(Path(rows[i]["onnx"]), preprocess([frame], backend.input_size())[0])
                check_output(rows[i], backend(x), want, source)
            timed = compare_latency(_timed_calls(backends, images[0]), rounds=rounds, per_round=per_round)
            for i, backend in backends.items():
                rows[i]["model"] = timed[f"{i}|model"].as_dict()
                rows[i]["end_to_end"] = timed[f"{i}|end_to_end"].as_dict()
                rows[i]["eval"] = _evaluate(backend, images, names, bootstrap)
    return {
        "tensorrt": trt.__version__,
        "gpu": device,
        "cuda_binding": describe(cuda),
        "dataset": {"yaml": str(data_yaml), "split": "val", "images": len(images)},
        "timing": {"rounds": rounds, "per_round": per_round, "batch": 1},
        "engines": rows,
        "onnxruntime": _onnxruntime_evals(onnx_files, images, names, bootstrap),
        "environment": {**environment(os.cpu_count() or 1), "GPU clocks": gpu_clocks()},
    }


def _load_engines(rows: List[dict], cuda, loaded: ExitStack) -> dict:
    """A runtime per built engine, closed with `loaded`; an engine the runtime refuses is reported in its row, as a
    build failure is, and the others still run."""
    from yoloslim.runtime.tensorrt import TensorRTBackend

    backends = {}
    for i, row in enumerate(rows):
        if "engine" not in row:
            continue
        try:
            backends[i] = loaded.enter_context(TensorRTBackend(row["engine"], cuda=cuda))
        except YoloslimError as error:
            row["error"] = f"built, but the runtime refused it: {error}"
    return backends


def _timed_calls(backends: dict, image: Path) -> dict:
    """Per engine, the model alone on a letterboxed image, and the image end to end: decode, letterbox, model, NMS."""
    import cv2

    from yoloslim.runtime.preprocess import preprocess

    calls = {}
    for i, backend in backends.items():
        x = preprocess([cv2.imread(str(image))], backend.input_size())[0]
        calls[f"{i}|model"] = lambda backend=backend, x=x: backend(x)
        calls[f"{i}|end_to_end"] = partial(end_to_end_frame, backend, image, 1, backend.input_size())
    return calls


def _evaluate(backend, images: list, names: dict, bootstrap: int) -> dict:
    """mAP with its interval, where the model's classes are the dataset's; else why not."""
    if backend.names != names:
        return {"skipped": f"the model's classes ({', '.join(backend.names.values())}) are not the dataset's"}
    records = predict_records(backend, images, backend.input_size(), progress=False)
    return summarise(records, names, bootstrap=bootstrap).as_dict()


def _onnxruntime_evals(onnx_files: Sequence[Path], images: list, names: dict, bootstrap: int) -> List[dict]:
    """The same mAP from ONNX Runtime on the CPU, where it is installed: what each engine's mAP is compared with."""
    if importlib.util.find_spec("onnxruntime") is None:
        return []
    from yoloslim.runtime.backends import OnnxRuntimeBackend

    return [
        {"onnx": str(onnx), "eval": _evaluate(OnnxRuntimeBackend(str(onnx)), images, names, bootstrap)}
        for onnx in onnx_files
    ]


def device_benchmark_markdown(result: dict) -> str:
    """The report as one Markdown table per backend, headed by what the figures depend on."""
    env = result["environment"]
    gpu = result["gpu"]
    lines = [
        f"# TensorRT {result['tensorrt']} on {gpu['name']} (compute capability {gpu['compute_capability']})",
        "",
        f"JetPack {env.get('JetPack') or '?'}, L4T {env.get('L4T') or '?'}, {result['cuda_binding']}; "
        f"power mode: {_first_line(env.get('power mode'))}; GPU clocks: {env.get('GPU clocks') or 'not found'}; "
        f"jetson_clocks: {_first_line(env.get('clocks'))}; hottest zone {env.get('max_temperature_c')} C.",
        f"mAP on {result['dataset']['images']} images of {result['dataset']['yaml']} (val); latency at batch 1, "
        f"{result['timing']['rounds']} interleaved rounds of {result['timing']['per_round']} calls.",
        "",
        "| ONNX | engine | float layers | build s | output vs reference | mAP50-95 (95% CI) | mAP50 | "
        "model p50 ms | p90 ms | FPS | FPS end to end |",
        "| --- | --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [_engine_line(row) for row in result["engines"]]
    if result["onnxruntime"]:
        lines += ["", "| ONNX (ONNX Runtime, CPU) | mAP50-95 (95% CI) | mAP50 |", "| --- | --- | ---: |"]
        lines += [f"| {Path(r['onnx']).name} | {_map_cells(r['eval'])} |" for r in result["onnxruntime"]]
    return "\n".join(lines) + "\n"


def _first_line(text: Optional[str]) -> str:
    return text.splitlines()[0] if text else "not found"


def _map_cells(found: dict) -> str:
    if "map" not in found:
        return f"{found['skipped']} | "
    low, high = found["ci95"].get("map", (float("nan"),) * 2)
    return f"{found['map']:.3f} ({low:.3f}-{high:.3f}) | {found['map50']:.3f}"


def _engine_line(row: dict) -> str:
    name = Path(row["onnx"]).name
    if "error" in row:
        return f"| {name} | {row['precision']}: failed ({row['error']}) | | | | | | | | | |"
    verdict = check_verdict(row["check"])
    model, e2e = row["model"], row["end_to_end"]
    return (
        f"| {name} | {row['precision']} | {row['float_layers']} | {row['build_s']} | {verdict} | "
        f"{_map_cells(row['eval'])} | {model['p50_ms']:.2f} | {model['p90_ms']:.2f} | {model['fps']:.0f} | "
        f"{e2e['fps']:.0f} |"
    )


def write_device_benchmark(result: dict, project: str = "runs/doctor", name: str = "benchmark") -> Path:
    """benchmark.json (everything) and benchmark.md (the tables) in a new run folder; return the folder."""
    from yoloslim.runtime.detect import new_run_dir
    from yoloslim.utils.files import write_text_atomic

    run = new_run_dir(project, name)
    write_text_atomic(run / "benchmark.json", json.dumps(result, indent=2, default=str))
    write_text_atomic(run / "benchmark.md", device_benchmark_markdown(result))
    return run
