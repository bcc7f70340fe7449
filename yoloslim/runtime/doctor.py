"""`yoloslim doctor`: what this device has, and what each command still needs.

With --selftest it builds every engine the shipped self-test ONNX files give on this TensorRT (FP32, FP16, INT8) and
compares each with ONNX Runtime's stored output. With --benchmark it builds the engines of the given ONNX files (the
shipped ones by default), checks them against ONNX Runtime where it is installed, times them, evaluates mAP where the
model's classes are the dataset's, records the power mode and clocks, and writes one JSON and Markdown report
(yoloslim.device_bench, after the evaluator it uses). All of it runs with the base install plus TensorRT; only the
benchmark writes, and only its report.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from yoloslim.runtime.onnx_meta import read_onnx_metadata
from yoloslim.utils.errors import YoloslimError

ASSETS = Path(__file__).parent / "assets"
SELFTEST_ONNX = ("selftest.onnx", "selftest-fp16.onnx", "selftest-int8.onnx")  # and selftest.npz: input, outputs
# How close an engine's output must be to ONNX Runtime's output of the same ONNX: the statistic of the error (each
# element's |engine - reference| over the largest |reference| of its output channel) and its bound. FP32 allows for
# TF32, which TensorRT uses by default on Ampere GPUs such as Orin. INT8 is judged by the mean: an activation that
# lands on the other side of a rounding step moves a box by a DFL bin, and TensorRT and ONNX Runtime round
# differently; on the shipped self-test model, 1e-4 of input noise moved ONNX Runtime's own INT8 output by 0.004 to
# 0.006 on average (0.07 to 0.08 at most), while the FP32 output in its place is 0.14 away on average.
CHECKS = {"fp32": ("max", 1e-2), "fp16": ("max", 3e-2), "int8": ("mean", 2e-2)}


def _run(command: List[str]) -> Optional[str]:
    if not shutil.which(command[0]):
        return None
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _version(module: str) -> Optional[str]:
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return None
    try:
        return str(getattr(__import__(module), "__version__", "installed"))
    except Exception as e:  # a broken install is a finding, not a crash
        return f"broken ({type(e).__name__}: {e})"


def l4t_release() -> Optional[str]:
    path = Path("/etc/nv_tegra_release")
    if not path.is_file():
        return None
    match = re.search(r"R(\d+)[^,]*, REVISION: ([\d.]+)", path.read_text())
    return f"{match.group(1)}.{match.group(2)}" if match else path.read_text().splitlines()[0]


def opencv_gstreamer() -> Optional[bool]:
    try:
        import cv2
    except ImportError:
        return None
    return bool(re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()))


def cuda_binding() -> Tuple[Optional[str], Optional[str]]:
    """(the CUDA binding that answered a call, with its GPU; None) or (None, why none did)."""
    from yoloslim.runtime.cuda import NoCudaBinding, describe, load_cuda

    try:
        binding = load_cuda()
    except NoCudaBinding as error:
        return None, "; ".join(error.failures)
    gpu = binding.device()
    return f"{describe(binding)} ({gpu['name']}, compute capability {gpu['compute_capability']})", None


def nvcc_release() -> Optional[str]:
    """nvcc's release line ('Cuda compilation tools, release 12.6, V12.6.68'); JetPack installs nvcc in
    /usr/local/cuda/bin, which is not on PATH by default."""
    for nvcc in ("nvcc", "/usr/local/cuda/bin/nvcc"):
        lines = (_run([nvcc, "--version"]) or "").splitlines()
        if lines:
            return next((line for line in lines if "release" in line), lines[-1])
    return None


def cuda_release(nvcc_line: Optional[str]) -> Optional[str]:
    """'12.6' from nvcc's 'Cuda compilation tools, release 12.6, V12.6.68'."""
    match = re.search(r"release (\d+\.\d+)", nvcc_line or "")
    return match.group(1) if match else None


def gpu_clocks() -> Optional[str]:
    """Each devfreq device's current and highest clock (the Jetson GPU is one: 17000000.gpu or .ga10b on Orin)."""
    found = []
    for node in sorted(Path("/sys/class/devfreq").glob("*")):
        try:
            current, highest = (int((node / f).read_text()) for f in ("cur_freq", "max_freq"))
        except (OSError, ValueError):
            continue
        found.append(f"{node.name} {current / 1e6:.0f} MHz (max {highest / 1e6:.0f})")
    return "; ".join(found) or None


def facts() -> Dict[str, Optional[str]]:
    from yoloslim.runtime.cuda import cuda_python_requirement
    from yoloslim.utils.machine import cpu_name, cpu_vector_isa, onnxruntime_channel_block

    nvcc = nvcc_release()
    block = onnxruntime_channel_block()
    cuda = cuda_release(nvcc)
    binding, no_binding = cuda_binding()
    return {
        "machine": f"{platform.machine()} {platform.system()}",
        "python": platform.python_version(),
        "CPU": f"{cpu_name()} ({cpu_vector_isa() or 'no x86 vector extension found'})",
        "prune --round-to for ONNX Runtime here": f"{block} (its convolutions take {block} channels at a time)"
        if block
        else None,
        "L4T": l4t_release(),
        "JetPack": _run(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"]),
        "TensorRT": _version("tensorrt"),
        "CUDA binding": binding,
        "why no CUDA binding": no_binding,
        "nvcc": nvcc,
        "cuda-python for this CUDA": cuda_python_requirement(cuda) if cuda else None,
        "onnxruntime": _version("onnxruntime"),
        "numpy": _version("numpy"),
        "OpenCV": _version("cv2"),
        "OpenCV GStreamer": {True: "yes", False: "no", None: None}[opencv_gstreamer()],
        "torch": _version("torch"),
        "ultralytics": _version("ultralytics"),
        "power mode": _run(["nvpmodel", "-q"]),
        "clocks": _run(["jetson_clocks", "--show"]),  # needs root; absent otherwise
        "GPU clocks": gpu_clocks(),
    }


NEEDS: Dict[str, Tuple[str, ...]] = {
    "detect / eval with .onnx": ("onnxruntime", "numpy", "OpenCV"),
    "detect / eval / bench with .engine": ("TensorRT", "CUDA binding", "numpy", "OpenCV"),
    "export --format engine, doctor --selftest / --benchmark": ("TensorRT", "CUDA binding", "numpy"),
    "train, prune, finetune, export --format onnx": ("torch", "ultralytics"),
}
SHOWN_ONLY_WHEN_FOUND = {"prune --round-to for ONNX Runtime here"}
WHY_NOT_FOUND = {"CUDA binding": "why no CUDA binding"}  # shown in the row of what was not found


def report() -> str:
    found = facts()
    why = {item: found.pop(reason) for item, reason in WHY_NOT_FOUND.items()}
    lines = ["| item | found |", "| --- | --- |"]
    lines += [
        f"| {k} | {v.splitlines()[0] if v else 'none usable: ' + why[k] if why.get(k) else 'not found'} |"
        for k, v in found.items()
        if v or k not in SHOWN_ONLY_WHEN_FOUND
    ]
    lines += ["", "| command | status |", "| --- | --- |"]
    for command, needs in NEEDS.items():
        missing = [n for n in needs if not found.get(n)]
        lines.append(f"| {command} | {'ready' if not missing else 'missing: ' + ', '.join(missing)} |")
    return "\n".join(lines)


# -- engines of ONNX files: built, checked, timed, evaluated ----------------------------------------------------------


def onnx_precision(path) -> str:
    """What `yoloslim export` recorded in the ONNX (fp16, int8); fp32 for any other ONNX."""
    return str(read_onnx_metadata(path).get("precision", "fp32"))


def engine_precisions(onnx_precision: str, trt_major: int) -> Tuple[str, ...]:
    """The engines an ONNX gives on this TensorRT: an FP32 ONNX builds FP32 and, before 11, FP16 through the builder
    flag; TensorRT 11 builds what the ONNX's types say, and FP16 and INT8 ONNX build their own precision everywhere."""
    if onnx_precision == "fp32":
        return ("fp32", "fp16") if trt_major < 11 else ("fp32",)
    return (onnx_precision,)


def output_error(got: np.ndarray, want: np.ndarray) -> Dict[str, float]:
    """Mean and largest |got - want| over the largest |want| of each output channel (boxes are pixels, scores 0-1)."""
    scale = np.maximum(np.abs(want).max(axis=(0, 2), keepdims=True), 1e-6)
    error = np.abs(got.astype(np.float64) - want) / scale
    return {"mean": float(error.mean()), "max": float(error.max())}


def build_engines(onnx_files: Sequence[Path], folder: Path, trt_major: int, device: dict) -> List[dict]:
    """Every engine each ONNX gives here, built into `folder`; a failed build is recorded with its reason."""
    from yoloslim.runtime.engine_file import read_engine_header
    from yoloslim.runtime.tensorrt import build_engine, yoloslim_metadata

    rows = []
    for onnx in onnx_files:
        source = onnx_precision(onnx)
        for precision in engine_precisions(source, trt_major):
            row = {"onnx": str(onnx), "onnx_precision": source, "precision": precision}
            start = time.perf_counter()
            try:
                engine = build_engine(
                    onnx,
                    out=folder / f"{onnx.stem}-{precision}.engine",
                    precision=precision,
                    workspace_gb=1.0,
                    timing_cache=folder / "timing.cache",
                    device=device,
                )
            except YoloslimError as error:
                row["error"] = str(error)
            else:
                row["engine"] = str(engine)
                row["build_s"] = round(time.perf_counter() - start, 1)
                row["float_layers"] = yoloslim_metadata(read_engine_header(engine)[1])["float_layers"]
            rows.append(row)
    return rows


def check_output(row: dict, got: np.ndarray, want: Optional[np.ndarray], source: str) -> None:
    """Record how far the engine's output is from the reference, and whether that is within its precision's bound."""
    row["check"] = {"reference": source}
    if want is not None:
        statistic, bound = CHECKS[row["precision"]]
        error = output_error(got, want)
        row["check"].update(error, statistic=statistic, bound=bound, passed=error[statistic] <= bound)


def environment(threads: int) -> dict:
    """What the figures depend on: machine, threads, library versions; on a Jetson its power mode and clocks."""
    from yoloslim.utils.machine import cpu_int8_dot_product, cpu_name, cpu_vector_isa

    found = facts()
    temps = []
    for zone in sorted(Path("/sys/devices/virtual/thermal").glob("thermal_zone*/temp")):
        try:
            temps.append(int(zone.read_text()) / 1000)
        except (OSError, ValueError):
            pass
    return {
        "cpu": cpu_name(),
        "cpu_vector_isa": cpu_vector_isa(),
        "cpu_int8_dot_product": cpu_int8_dot_product(),
        "cores": os.cpu_count(),
        "threads": threads,
        "max_temperature_c": max(temps) if temps else None,
        **{
            k: v
            for k, v in found.items()
            if k
            in (
                "machine",
                "python",
                "L4T",
                "JetPack",
                "TensorRT",
                "onnxruntime",
                "numpy",
                "OpenCV",
                "torch",
                "power mode",
                "clocks",
            )
        },
    }


def selftest() -> Tuple[bool, str]:
    """Build the engines of the shipped self-test ONNX files, run each on the stored input, compare with ONNX
    Runtime's stored output of its ONNX."""
    from yoloslim.runtime.cuda import load_cuda
    from yoloslim.runtime.tensorrt import TensorRTBackend, import_tensorrt, version_tuple

    trt = import_tensorrt()
    cuda = load_cuda()
    stored = np.load(ASSETS / "selftest.npz")
    with tempfile.TemporaryDirectory() as tmp:
        major = version_tuple(trt.__version__)[0]
        rows = build_engines([ASSETS / name for name in SELFTEST_ONNX], Path(tmp), major, cuda.device())
        for row in rows:
            if "engine" in row:
                with TensorRTBackend(row["engine"], cuda=cuda) as backend:
                    got = backend(stored["images"])
                check_output(row, got, stored[row["onnx_precision"]], "stored ONNX Runtime output")
    lines = [f"TensorRT {trt.__version__} self-test"] + [_selftest_line(row) for row in rows]
    if major >= 11:
        lines.append("(TensorRT 11 builds FP16 only from the FP16 ONNX, so the FP32 ONNX gives no FP16 engine)")
    return all(row.get("check", {}).get("passed") for row in rows), "\n".join(lines)


def _selftest_line(row: dict) -> str:
    name = f"{Path(row['onnx']).name} -> {row['precision']}"
    if "error" in row:
        return f"{name}: FAIL ({row['error']})"
    return f"{name}: {check_verdict(row['check'])}"


def check_verdict(check: dict) -> str:
    """'pass (mean error 1.2e-03, allowed 2e-02)', or where the reference came from when there was none."""
    if "passed" not in check:
        return check["reference"]
    statistic = check["statistic"]
    verdict = "pass" if check["passed"] else "FAIL"
    return f"{verdict} ({statistic} error {check[statistic]:.1e}, allowed {check['bound']:.0e})"
