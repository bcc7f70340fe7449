"""`yoloslim doctor`: what this device has, and what each command still needs. Reads only; changes nothing."""

from __future__ import annotations

import importlib.util
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Tuple


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


def cuda_binding() -> Optional[str]:
    for module in ("cuda.bindings", "cuda", "pycuda"):
        try:
            if importlib.util.find_spec(module) is not None:
                return {"cuda.bindings": "cuda-python", "cuda": "cuda-python (old cudart)", "pycuda": "pycuda"}[module]
        except ModuleNotFoundError:
            continue
    return None


def nvcc_release() -> Optional[str]:
    """nvcc's last line (its release); JetPack installs it in /usr/local/cuda/bin, which is not on PATH by default."""
    for nvcc in ("nvcc", "/usr/local/cuda/bin/nvcc"):
        lines = (_run([nvcc, "--version"]) or "").splitlines()
        if lines:
            return lines[-1]
    return None


def facts() -> Dict[str, Optional[str]]:
    return {
        "machine": f"{platform.machine()} {platform.system()}",
        "python": platform.python_version(),
        "L4T": l4t_release(),
        "JetPack": _run(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"]),
        "TensorRT": _version("tensorrt"),
        "CUDA binding": cuda_binding(),
        "nvcc": nvcc_release(),
        "onnxruntime": _version("onnxruntime"),
        "numpy": _version("numpy"),
        "OpenCV": _version("cv2"),
        "OpenCV GStreamer": {True: "yes", False: "no", None: None}[opencv_gstreamer()],
        "torch": _version("torch"),
        "ultralytics": _version("ultralytics"),
        "power mode": _run(["nvpmodel", "-q"]),
        "clocks": _run(["jetson_clocks", "--show"]),
    }


NEEDS: Dict[str, Tuple[str, ...]] = {
    "detect / eval with .onnx": ("onnxruntime", "numpy", "OpenCV"),
    "detect / eval / bench with .engine": ("TensorRT", "CUDA binding", "numpy", "OpenCV"),
    "export --format engine": ("TensorRT", "CUDA binding", "numpy"),
    "train, prune, finetune, export --format onnx": ("torch", "ultralytics"),
}


def report() -> str:
    found = facts()
    lines = ["| item | found |", "| --- | --- |"]
    lines += [f"| {k} | {(v or 'not found').splitlines()[0] if v else 'not found'} |" for k, v in found.items()]
    lines += ["", "| command | status |", "| --- | --- |"]
    for command, needs in NEEDS.items():
        missing = [n for n in needs if not found.get(n)]
        lines.append(f"| {command} | {'ready' if not missing else 'missing: ' + ', '.join(missing)} |")
    return "\n".join(lines)


ASSETS = Path(__file__).parent / "assets"
SELFTEST_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}  # max |engine - reference| / max |reference|


def selftest() -> Tuple[bool, str]:
    """Build engines from the shipped self-test ONNX, run them, compare with the shipped ONNX Runtime output."""
    import tempfile

    import numpy as np

    from yoloslim.runtime.tensorrt import TensorRTBackend, build_engine, import_tensorrt, version_tuple

    trt = import_tensorrt()
    reference = np.load(ASSETS / "selftest.npz")
    lines, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for precision, tolerance in SELFTEST_TOLERANCE.items():
            if precision == "fp16" and version_tuple(trt.__version__)[0] >= 11:
                lines.append("fp16: skipped (TensorRT 11 builds FP16 only from an FP16 ONNX)")
                continue
            engine = build_engine(
                ASSETS / "selftest.onnx", out=Path(tmp) / f"{precision}.engine", precision=precision, workspace_gb=0.5
            )
            backend = TensorRTBackend(engine)
            try:
                error = float(
                    np.abs(backend(reference["images"]) - reference["output0"]).max()
                    / np.abs(reference["output0"]).max()
                )
            finally:
                backend.close()
            passed = error <= tolerance
            ok &= passed
            lines.append(
                f"{precision}: {'pass' if passed else 'FAIL'} (relative error {error:.2e}, allowed {tolerance:.0e})"
            )
    return ok, f"TensorRT {trt.__version__} self-test\n" + "\n".join(lines)
