"""Export: ONNX and Q/DQ INT8 ONNX on the host (onnx.py, qdq.py); TensorRT engines on the device
(yoloslim.runtime.tensorrt, which needs only tensorrt and numpy). `export()` is the API under `yoloslim export`."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.files import output_path


@dataclass(frozen=True)
class ExportConfig:
    format: str = "onnx"  # onnx | engine
    precision: str = "fp32"  # fp32 | fp16 | int8
    imgsz: Optional[int] = None  # None: the size the checkpoint was trained at, else 640
    batch: int = 1
    dynamic: bool = False
    max_batch: int = 8  # for --dynamic engines: the optimization profile's largest batch
    workspace: float = 2.0  # GiB
    raw: bool = False  # bare TensorRT plan, for trtexec and DeepStream
    version_compatible: bool = False  # runs on later TensorRT releases of the same major version (8.6+)
    calibration_images: int = 500
    target: str = "tensorrt"  # INT8 flavour: tensorrt (Q/DQ for TensorRT) | cpu (for ONNX Runtime's CPU kernels)

    def __post_init__(self):
        if self.format not in ("onnx", "engine"):
            raise YoloslimError(f"unknown format {self.format!r}; use onnx or engine")
        if self.precision not in ("fp32", "fp16", "int8"):
            raise YoloslimError(f"unknown precision {self.precision!r}; use fp32, fp16 or int8")
        if self.target not in ("tensorrt", "cpu"):
            raise YoloslimError(f"unknown target {self.target!r}; use tensorrt or cpu")
        if self.target == "cpu" and self.precision != "int8":
            raise YoloslimError(
                f"target cpu is an INT8 flavour, not for {self.precision}; set precision int8 or leave target tensorrt"
            )
        if self.target == "cpu" and self.format == "engine":
            raise YoloslimError("TensorRT engines are built from the tensorrt INT8 flavour; set target tensorrt")
        if self.precision == "int8" and self.dynamic:
            raise YoloslimError("INT8 calibration needs a static batch; set dynamic=False and a batch N")
        if self.batch < 1:
            raise YoloslimError(f"batch must be at least 1, got {self.batch}")
        if self.dynamic and self.batch > self.max_batch:
            raise YoloslimError(
                f"batch {self.batch} is the engine's usual batch and must not exceed max_batch {self.max_batch}; "
                "raise max_batch"
            )


def export(weights, config: ExportConfig, data=None, out=None) -> Path:
    """Export `weights` (.pt, or .onnx for engines) as the config says; return the written file."""
    weights = Path(weights)
    if config.format == "onnx":
        return _export_onnx(weights, config, data, out)
    onnx_path = weights if weights.suffix == ".onnx" else _export_onnx(weights, config, data, None)
    from yoloslim.runtime.cuda import load_cuda
    from yoloslim.runtime.tensorrt import build_engine, refuse_cpu_flavour

    refuse_cpu_flavour(onnx_path)  # before looking for CUDA, so that the host says so too

    batch = (1, config.batch, config.max_batch) if config.dynamic else (config.batch,) * 3
    return build_engine(
        onnx_path,
        out=out,
        precision=config.precision,
        batch=batch,
        workspace_gb=config.workspace,
        timing_cache=onnx_path.with_suffix(".timing.cache"),
        raw=config.raw,
        device=load_cuda().device(),
        version_compatible=config.version_compatible,
    )


def _export_onnx(weights: Path, config: ExportConfig, data, out: Optional[Path]) -> Path:
    from yoloslim.export.onnx import export_onnx

    if weights.suffix != ".pt":
        raise YoloslimError(f"ONNX export takes an Ultralytics .pt checkpoint, not {weights.name}")
    if config.precision == "fp32":
        return export_onnx(weights, imgsz=config.imgsz, batch=config.batch, dynamic=config.dynamic, out=out)
    from yoloslim.export.qdq import int8_name

    named = int8_name(weights.stem, config.target) if config.precision == "int8" else f"{weights.stem}-fp16.onnx"
    target = output_path(out, weights.with_name(named), weights)
    trained = _trained_quantization(weights, config)
    if trained is not None and data:
        raise YoloslimError(
            f"{weights.name} is quantization-aware and exports with the ranges it trained, not from data; drop --data"
        )
    if config.precision == "int8" and trained is None:  # the calibration set is checked before any work
        from yoloslim.data import resolve_data
        from yoloslim.export.qdq import calibration_images

        data = resolve_data(_calibration_data(weights, data))
        calibration_images(data, config.calibration_images)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.stem}.") as work:
        fp32 = export_onnx(
            weights, imgsz=config.imgsz, batch=config.batch, dynamic=config.dynamic, out=Path(work) / "fp32.onnx"
        )
        if config.precision == "fp16":
            from yoloslim.export.fp16 import convert_fp16

            return convert_fp16(fp32, out=target)
        if trained is not None:
            from yoloslim.export.fakequant import quantize_trained

            return quantize_trained(fp32, trained, out=target)
        from yoloslim.export.qdq import quantize_int8

        return quantize_int8(fp32, data, out=target, count=config.calibration_images, target=config.target)


def _calibration_data(weights: Path, data):
    """The dataset INT8 calibrates on: `data`, else the one the checkpoint was trained on where that file is here,
    else the embedded dataset for a model of its classes (the demo's); anything else would calibrate a model on
    images it never saw, so it is refused."""
    if data:
        return data
    from yoloslim.data.synthetic import default_config
    from yoloslim.utils.checks import load_detection_checkpoint

    model, ckpt = load_detection_checkpoint(weights, classic=True)
    args = ckpt.get("train_args") or ckpt.get("opt") or {}
    trained_on = args.get("data") if isinstance(args, dict) else None
    if trained_on and Path(trained_on).is_file():
        return trained_on
    names = model.names.values() if isinstance(model.names, dict) else model.names
    if list(names) == list(default_config().classes):
        return None
    raise YoloslimError(
        f"INT8 calibration needs this model's training images and {trained_on or 'its dataset'} is not here; pass "
        "--data data.yaml"
    )


def _trained_quantization(weights: Path, config: ExportConfig):
    """A quantization-aware checkpoint's own INT8 quantization (no calibration), or None: a plain checkpoint, or not
    an INT8 export."""
    if config.precision != "int8":
        return None
    from yoloslim.export.fakequant import trained_quantization

    return trained_quantization(weights, config.target)
