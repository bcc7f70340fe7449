"""TensorRT: building engines on the device, and running them. The only module that imports tensorrt (lazily).

Builds from the ONNX (FP32 or FP16) or the Q/DQ INT8 ONNX that `yoloslim export` writes on the host, with only
tensorrt and numpy installed, across the versions JetPack ships:

| TensorRT | JetPack | network | FP16 | INT8 |
| --- | --- | --- | --- | --- |
| 8.5, 8.6 | 5.1, 6.0 | EXPLICIT_BATCH flag | BuilderFlag.FP16 | Q/DQ ONNX + BuilderFlag.INT8 (+FP16 for the float parts) |
| 10.x | 6.1, 6.2, 7 | explicit batch is the default | BuilderFlag.FP16 | Q/DQ ONNX + BuilderFlag.INT8 (+FP16) |
| 11.x | 7.2.2+ | always strongly typed | only from an FP16 ONNX | only from a Q/DQ ONNX |

The runtime uses the tensor-name API (num_io_tensors, set_tensor_address, execute_async_v3), present from 8.5 on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from yoloslim.runtime.engine_file import read_engine_file, write_engine_file
from yoloslim.runtime.onnx_meta import read_onnx_metadata
from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.files import output_path, write_bytes_atomic

PRECISIONS = ("fp32", "fp16", "int8")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise YoloslimError(
            "TensorRT is not installed; on a Jetson it comes with JetPack (python3-libnvinfer)"
        ) from None
    return trt


def version_tuple(version: str) -> Tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:3] if p.isdigit())


def network_flags(trt, major: int) -> int:
    """Explicit batch must be asked for before 10 (deprecated there, default since); 11 is strongly typed anyway."""
    if major < 10:
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return 0


def network_precisions(trt, network) -> set:
    """What the parsed network itself carries: 'int8' if it has Q/DQ layers, 'fp16' if it has half tensors."""
    found = set()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE):
            found.add("int8")
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype == trt.DataType.HALF:
                found.add("fp16")
    return found


def set_precision(trt, major: int, config, network, precision: str) -> None:
    """Enable the precision the way this TensorRT version wants it, or say why it cannot be built. The request must
    match what the ONNX carries: TensorRT 11 builds whatever the network's types say, so a mismatch would give an
    engine whose recorded precision is not the one it runs."""
    carried = network_precisions(trt, network)
    if precision == "int8" and "int8" not in carried:
        raise YoloslimError(
            "INT8 engines are built from a Q/DQ ONNX; run `yoloslim export --format onnx --precision int8 --data data.yaml` on the host first"
        )
    if "int8" in carried and precision != "int8":
        raise YoloslimError(
            f"this ONNX is quantized (Q/DQ); build it with --precision int8, or build {precision} from the float ONNX"
        )
    if "fp16" in carried and precision == "fp32":
        raise YoloslimError(
            "this ONNX holds FP16 weights; build it with --precision fp16, or build fp32 from the FP32 ONNX"
        )
    if major >= 11:
        if precision == "fp16" and "fp16" not in carried:
            raise YoloslimError(
                "TensorRT 11 builds FP16 only from an FP16 ONNX (strong typing); export it with --precision fp16 on the host"
            )
        return
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # with INT8, the layers left in float run in FP16
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # still required before 11 to enable int8 kernels for Q/DQ


def add_batch_profile(builder, config, network, batch: Tuple[int, int, int], imgsz) -> None:
    """One optimization profile spanning batch sizes (min, opt, max) at the exported image size, for every input
    with a dynamic batch (Ultralytics' dynamic export also leaves height and width open)."""
    height, width = (list(imgsz) * 2)[:2] if isinstance(imgsz, (list, tuple)) else (imgsz, imgsz)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if shape[0] == -1:
            fixed = [shape[1], height if shape[2] == -1 else shape[2], width if shape[3] == -1 else shape[3]]
            profile.set_shape(tensor.name, *[tuple([b] + fixed) for b in batch])
    config.add_optimization_profile(profile)


def build_engine(
    onnx_path,
    out=None,
    precision: str = "fp16",
    batch: Tuple[int, int, int] = (1, 1, 1),
    workspace_gb: float = 2.0,
    timing_cache=None,
    version_compatible: bool = False,
    raw: bool = False,
    device: Optional[dict] = None,
) -> Path:
    """Build an engine from an ONNX on this device; write it with Ultralytics' header (or bare with raw=True)."""
    trt = import_tensorrt()
    if precision not in PRECISIONS:
        raise YoloslimError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise YoloslimError(
            f"ONNX file {onnx_path} does not exist; export it on the host with yoloslim export --format onnx"
        )
    major = version_tuple(trt.__version__)[0]
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, major))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise YoloslimError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    set_precision(trt, major, config, network, precision)
    dynamic = any(network.get_input(i).shape[0] == -1 for i in range(network.num_inputs))
    if dynamic:
        add_batch_profile(builder, config, network, batch, read_onnx_metadata(onnx_path).get("imgsz", 640))
    if version_compatible:
        if version_tuple(trt.__version__) < (8, 6):
            raise YoloslimError("version-compatible engines need TensorRT 8.6 or later")
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    out = output_path(out, onnx_path.with_suffix(".engine"), onnx_path)
    cache = _load_timing_cache(config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise YoloslimError(
            f"TensorRT {trt.__version__} failed to build {onnx_path}; rerun with a larger --workspace or see its log above"
        )
    meta = (
        None
        if raw
        else engine_metadata(onnx_path, precision, trt.__version__, dynamic, batch, version_compatible, device)
    )
    engine = write_engine_file(out, bytes(plan), meta)
    if timing_cache:
        write_bytes_atomic(timing_cache, bytes(cache.serialize()))
    return engine


def _load_timing_cache(config, path):
    """The cache of earlier builds on this device, so rebuilds skip kernel timing; an empty one if there is none or
    it came from another TensorRT or GPU (TensorRT refuses it then)."""
    data = Path(path).read_bytes() if path and Path(path).is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def engine_metadata(onnx_path, precision, trt_version, dynamic, batch, version_compatible, device) -> dict:
    """Ultralytics' metadata from the ONNX (names, stride, imgsz, task...) plus what yoloslim adds."""
    from yoloslim import __version__

    meta = {k: v for k, v in read_onnx_metadata(onnx_path).items() if k != "precision"}
    meta.update(
        batch=batch[2] if dynamic else meta.get("batch", batch[0]),
        dynamic=dynamic,
        precision=precision,
        tensorrt=trt_version,
        yoloslim=__version__,
        version_compatible=version_compatible,
        device=device or {},
    )
    return meta


def check_engine_compatible(meta: dict, trt_version: str, device: dict) -> None:
    """Refuse, with a clear message, an engine this TensorRT or this GPU cannot run (deserialising it could crash)."""
    built = meta.get("tensorrt")
    if built:
        same = version_tuple(built) == version_tuple(trt_version)
        forward = (
            meta.get("version_compatible")
            and version_tuple(built)[0] == version_tuple(trt_version)[0]
            and version_tuple(built) <= version_tuple(trt_version)
        )
        if not (same or forward):
            raise YoloslimError(
                f"this engine was built with TensorRT {built} but this device has {trt_version}; rebuild it here with yoloslim export --format engine"
            )
    built_on = (meta.get("device") or {}).get("compute_capability")
    if built_on and device.get("compute_capability") and built_on != device["compute_capability"]:
        raise YoloslimError(
            f"this engine was built for a GPU of compute capability {built_on} ({meta['device'].get('name', '?')}), this one is "
            f"{device['compute_capability']} ({device.get('name', '?')}); rebuild it on this device"
        )


class TensorRTBackend:
    """Runs an engine: one host and one device buffer per I/O tensor, by name; copy in, execute, copy out on a stream."""

    def __init__(self, path, cuda=None):
        from yoloslim.runtime.cuda import load_cuda

        trt = import_tensorrt()
        self.cuda = cuda or load_cuda()
        meta, plan = read_engine_file(path)
        check_engine_compatible(meta, trt.__version__, self.cuda.device())
        self.meta = meta
        self.names: Dict[int, str] = {int(k): v for k, v in (meta.get("names") or {}).items()}
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        if meta.get("version_compatible"):
            self.runtime.engine_host_code_allowed = True
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise YoloslimError(
                f"TensorRT {trt.__version__} cannot load {path}: built by another TensorRT version or for another GPU; rebuild it on this device"
            )
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.host, self.device = {}, {}
        for name in self.inputs:
            shape = tuple(self.engine.get_tensor_shape(name))
            if (
                -1 in shape
            ):  # dynamic: buffers for the profile's largest input, which the context must know to size outputs
                shape = tuple(self.engine.get_tensor_profile_shape(name, 0)[2])
                self._set_input_shape(name, shape)
            self._allocate(trt, name, shape)
        for (
            name
        ) in self.outputs:  # every dimension follows from the inputs', the anchors too when height and width are open
            self._allocate(trt, name, tuple(self.context.get_tensor_shape(name)))
        imgsz = meta.get("imgsz") or [self.host[self.inputs[0]].shape[2]]
        self.imgsz = int(imgsz[0] if isinstance(imgsz, (list, tuple)) else imgsz)

    def _allocate(self, trt, name: str, shape: Tuple[int, ...]) -> None:
        self.host[name] = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
        self.device[name] = self.cuda.malloc(self.host[name].nbytes)
        self.context.set_tensor_address(name, self.device[name])

    def _set_input_shape(self, name: str, shape: Tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):
            raise YoloslimError(
                f"this engine does not take input {name} of shape {shape}; rebuild it for that shape with yoloslim export --format engine"
            )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        name = self.inputs[0]
        n = batch.shape[0]
        largest = self.host[name].shape
        if batch.ndim != len(largest) or n > largest[0] or batch.shape[1:] != largest[1:]:
            raise YoloslimError(
                f"this engine takes batches of up to {largest[0]} images shaped {largest[1:]}, got {batch.shape}; "
                "rebuild it with --dynamic --max-batch N for larger batches"
            )
        self._set_input_shape(name, batch.shape)
        host_in = self.host[name][:n]
        np.copyto(host_in, batch, casting="same_kind")
        self.cuda.to_device(self.device[name], host_in, self.stream)
        if not self.context.execute_async_v3(self.stream):
            raise YoloslimError("TensorRT execution failed; see the TensorRT log above")
        out = self.outputs[0]
        shape = tuple(self.context.get_tensor_shape(out))
        host_out = self.host[out].reshape(-1)[: int(np.prod(shape))].reshape(shape)
        self.cuda.to_host(host_out, self.device[out], self.stream)
        self.cuda.synchronize(self.stream)
        return host_out.astype(np.float32, copy=True)

    def close(self) -> None:
        for ptr in self.device.values():
            self.cuda.free(ptr)
        self.device.clear()
        if self.stream is not None:
            self.cuda.destroy_stream(self.stream)
            self.stream = None
