"""TensorRT: building engines on the device, and running them. The only module that imports tensorrt (lazily).

Builds from the ONNX (FP32 or FP16) or the Q/DQ INT8 ONNX that `yoloslim export` writes on the host, with only
tensorrt and numpy installed, across the versions JetPack ships:

| TensorRT | JetPack | network | FP16 | INT8 | float layers |
| --- | --- | --- | --- | --- | --- |
| 8.5, 8.6 | 5.1, 6.0 | EXPLICIT_BATCH flag | FP16 flag | Q/DQ ONNX + INT8, FP16 flags | FP16 or FP32 per layer |
| 10.x | 6.1, 6.2, 7 | explicit batch by default | FP16 flag | Q/DQ ONNX + INT8, FP16 flags | FP16 or FP32 per layer |
| 11.x | 7.2.2+ | always strongly typed | only from an FP16 ONNX | only from a Q/DQ ONNX | the ONNX's own types |

"Float layers" are those outside Q/DQ: on 11, an INT8 engine of yoloslim's Q/DQ ONNX (quantized from the FP32 model)
runs them in FP32.

What differs between versions is decided by small functions of the version (network_flags, set_precision,
float_layers, engine_refusal); the calls into tensorrt stay in build_engine and TensorRTBackend.

The runtime uses the tensor-name API (num_io_tensors, set_tensor_address, execute_async_v3), present from 8.5 on, with
one page-locked host buffer and one device buffer per I/O tensor, as NVIDIA's Python samples allocate them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from yoloslim.runtime.backends import HeadOutput
from yoloslim.runtime.engine_file import read_engine_file, write_engine_file
from yoloslim.runtime.onnx_meta import check_output_shape, head_kind, read_onnx_metadata
from yoloslim.runtime.postprocess import nms_layout
from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.files import output_path, write_bytes_atomic

PRECISIONS = ("fp32", "fp16", "int8")
METADATA_KEY = "yoloslim"  # yoloslim's own engine metadata, under one key beside Ultralytics' keys

# TensorRT DataType names -> numpy. TensorRT 8.5.2's trt.nptype builds its table with np.bool, which numpy 1.24
# removed, so it raises AttributeError for every type on JetPack 5 once pip has installed numpy 1.24.
NUMPY_DTYPES = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}

# Version-compatible engines across major versions, as NVIDIA lists them ("Engine Compatibility", TensorRT 10 and
# 11 developer guides; TensorRT 11.4 support matrix): 8.x (from 8.6) on 9 and 10, 9 on 10, 10 on 11; nothing else.
CROSS_MAJOR_RUNS = {(8, 9), (8, 10), (9, 10), (10, 11)}


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise YoloslimError(
            "TensorRT is not installed; on a Jetson it comes with JetPack (python3-libnvinfer)"
        ) from None
    return trt


def version_tuple(version: str) -> Tuple[int, ...]:
    """'8.5.2.2' -> (8, 5, 2, 2): every leading numeric part, the build number included."""
    parts = []
    for part in str(version).split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def numpy_dtype(trt_dtype) -> np.dtype:
    """The numpy type of a TensorRT DataType, by its name (str gives 'DataType.FLOAT' in every version)."""
    name = str(trt_dtype).rsplit(".", 1)[-1]
    if name not in NUMPY_DTYPES:
        raise YoloslimError(
            f"this engine has a {name} input or output, which numpy cannot hold; export the ONNX with float32 I/O"
        )
    return np.dtype(NUMPY_DTYPES[name])


def network_flags(trt, version: Tuple[int, ...]) -> int:
    """Explicit batch must be asked for before 10 (deprecated there, default since; 11 has no such flag)."""
    if version[0] < 10:
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return 0


def cast_sets_output_type(version: Tuple[int, ...]) -> bool:
    """TensorRT 8.5's ONNX parser turns Cast into an identity layer with its output type set, and the output tensor's
    dtype shows the input's type until the build; ICastLayer, whose output carries the type, came in 8.6."""
    return version < (8, 6)


def network_precisions(trt, version: Tuple[int, ...], network) -> set:
    """What the parsed network itself carries: 'int8' if it has Q/DQ layers, 'fp16' if it has half tensors."""
    found = set()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE):
            found.add("int8")
        for j in range(layer.num_outputs):
            typed = cast_sets_output_type(version) and layer.output_type_is_set(j)
            dtype = layer.get_output_type(j) if typed else layer.get_output(j).dtype
            if dtype == trt.DataType.HALF:
                found.add("fp16")
    return found


def set_precision(trt, version: Tuple[int, ...], config, carried: set, precision: str) -> None:
    """Enable the precision the way this TensorRT version wants it, or say why it cannot be built. The request must
    match what the ONNX carries: TensorRT 11 builds whatever the network's types say, so a mismatch would give an
    engine whose recorded precision is not the one it runs."""
    if precision == "int8" and "int8" not in carried:
        raise YoloslimError(
            "INT8 engines are built from a Q/DQ ONNX; run "
            "`yoloslim export --format onnx --precision int8 --data data.yaml` on the host first"
        )
    if "int8" in carried and precision != "int8":
        raise YoloslimError(
            f"this ONNX is quantized (Q/DQ); build it with --precision int8, or build {precision} from the float ONNX"
        )
    if "fp16" in carried and precision == "fp32":
        raise YoloslimError(
            "this ONNX holds FP16 weights; build it with --precision fp16, or build fp32 from the FP32 ONNX"
        )
    if version[0] >= 11:
        if precision == "fp16" and "fp16" not in carried:
            raise YoloslimError(
                "TensorRT 11 builds FP16 only from an FP16 ONNX (strong typing); "
                "export it with --precision fp16 on the host"
            )
        return
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # with INT8, the layers left in float may run in FP16
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # still required before 11 to enable int8 kernels for Q/DQ


def float_layers(version: Tuple[int, ...], precision: str, carried: set) -> str:
    """What the layers outside Q/DQ (all of them for fp32 and fp16) compute in. Before 11 the FP16 flag lets TensorRT
    pick FP16 or FP32 per layer; 11 is strongly typed, so they keep the ONNX's types: an INT8 engine from a Q/DQ ONNX
    of the FP32 model runs everything but the quantized convolutions in FP32."""
    if precision == "fp32":
        return "fp32"
    if version[0] >= 11:
        return "fp16 and fp32, as the ONNX types them" if "fp16" in carried else "fp32"
    return "fp16 or fp32, TensorRT's choice per layer"


def has_open_dimension(network) -> bool:
    """Whether any input leaves a dimension open (-1); TensorRT builds such a network only with a profile."""
    return any(-1 in tuple(network.get_input(i).shape) for i in range(network.num_inputs))


def add_input_profile(builder, config, network, batch: Tuple[int, int, int], imgsz) -> None:
    """One optimization profile for every input with an open dimension: an open batch spans the batch sizes (min,
    opt, max), an open height or width is the exported image size (Ultralytics' dynamic export leaves all three
    open; an ONNX may fix the batch and leave the size open)."""
    height, width = (list(imgsz) * 2)[:2] if isinstance(imgsz, (list, tuple)) else (imgsz, imgsz)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if -1 not in shape:
            continue
        if len(shape) != 4 or shape[1] == -1:
            raise YoloslimError(
                f"input {tensor.name} has shape {tuple(shape)}; yoloslim builds engines for images (N, 3, H, W) with "
                "a known channel count: export the ONNX with yoloslim export"
            )
        fixed = [shape[1], height if shape[2] == -1 else shape[2], width if shape[3] == -1 else shape[3]]
        sizes = batch if shape[0] == -1 else (shape[0],) * 3
        profile.set_shape(tensor.name, *[tuple([b] + fixed) for b in sizes])
    config.add_optimization_profile(profile)


def refuse_cpu_flavour(onnx_path) -> None:
    """Refuse the CPU flavour of a Q/DQ ONNX (uint8 activations with zero points, placed for ONNX Runtime), which
    yoloslim.export.qdq marks in the metadata. A missing file is build_engine's to report."""
    if Path(onnx_path).is_file() and read_onnx_metadata(onnx_path).get("int8_target") == "cpu":
        raise YoloslimError(f"{onnx_path} is the CPU flavour of INT8; export with --target tensorrt for an engine")


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
    refuse_cpu_flavour(onnx_path)
    version = version_tuple(trt.__version__)
    if version_compatible and version < (8, 6):
        raise YoloslimError("version-compatible engines need TensorRT 8.6 or later")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, version))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise YoloslimError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    carried = network_precisions(trt, version, network)
    set_precision(trt, version, config, carried, precision)
    dynamic = has_open_dimension(network)
    open_batch = any(network.get_input(i).shape[0] == -1 for i in range(network.num_inputs))
    if dynamic:
        add_input_profile(builder, config, network, batch, read_onnx_metadata(onnx_path).get("imgsz", 640))
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    out = output_path(out, onnx_path.with_suffix(".engine"), onnx_path)
    cache = _load_timing_cache(config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise YoloslimError(
            f"TensorRT {trt.__version__} failed to build {onnx_path}; "
            "rerun with a larger --workspace or see its log above"
        )
    own = {
        "precision": precision,
        "float_layers": float_layers(version, precision, carried),
        "tensorrt": trt.__version__,
        "version_compatible": version_compatible,
        "dynamic": dynamic,
        "device": device or {},
    }
    engine = write_engine_file(out, bytes(plan), None if raw else engine_metadata(onnx_path, open_batch, batch, own))
    if timing_cache:
        write_bytes_atomic(timing_cache, bytes(cache.serialize()))
    return engine


def _load_timing_cache(config, path):
    """The cache of earlier builds on this device, so rebuilds skip kernel timing. A cache TensorRT cannot read
    (another TensorRT version) comes back as None and one from another GPU is refused by set_timing_cache; both are
    checked, as NVIDIA's samples do (shared/utils/cacheUtils.cpp), and the build starts from an empty cache."""
    data = Path(path).read_bytes() if path and Path(path).is_file() else b""
    cache = config.create_timing_cache(data) if data else None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def engine_metadata(onnx_path, open_batch: bool, batch: Tuple[int, int, int], own: dict) -> dict:
    """Ultralytics' metadata from the ONNX (names, stride, imgsz, task, args...) as Ultralytics writes it, and
    yoloslim's under METADATA_KEY. Ultralytics' backend copies every top-level key onto itself (BaseBackend.
    apply_metadata), so a top-level 'device' would replace its torch device and break YOLO('model.engine')."""
    from yoloslim import __version__

    meta = {k: v for k, v in read_onnx_metadata(onnx_path).items() if k != "precision"}
    meta["batch"] = batch[2] if open_batch else meta.get("batch", batch[0])
    meta[METADATA_KEY] = {"version": __version__, **own}
    return meta


def yoloslim_metadata(meta: dict) -> dict:
    """yoloslim's part of an engine's metadata; empty for an engine built elsewhere (Ultralytics, trtexec)."""
    own = meta.get(METADATA_KEY)
    return own if isinstance(own, dict) else {}


def engine_refusal(built: str, version_compatible: bool, runtime: str) -> Optional[str]:
    """Why TensorRT `runtime` cannot run an engine built by TensorRT `built`, or None if it can. An ordinary engine
    runs only on the exact version that built it, build number included; a version-compatible one (8.6 or later) on
    that version or a later one of the same major, or of a major NVIDIA supports it on (CROSS_MAJOR_RUNS)."""
    made, here = version_tuple(built), version_tuple(runtime)
    if made == here:
        return None
    if not version_compatible:
        return (
            f"it was built with TensorRT {built} and this device has {runtime}; an engine runs only on the TensorRT "
            "that built it"
        )
    if made > here:
        return f"it was built with TensorRT {built}, newer than this device's {runtime}"
    if made[0] != here[0] and (made[0], here[0]) not in CROSS_MAJOR_RUNS:
        return f"NVIDIA supports no version-compatible engine of TensorRT {made[0]} on TensorRT {here[0]}"
    return None


def check_engine_compatible(meta: dict, trt_version: str, device: dict) -> None:
    """Refuse, with a clear message, an engine this TensorRT or this GPU cannot run (deserialising it could crash)."""
    own = yoloslim_metadata(meta)
    if own.get("tensorrt"):
        reason = engine_refusal(own["tensorrt"], bool(own.get("version_compatible")), trt_version)
        if reason:
            raise YoloslimError(f"this engine cannot run here: {reason}; rebuild it here with yoloslim export")
    built_on = (own.get("device") or {}).get("compute_capability")
    if built_on and device.get("compute_capability") and built_on != device["compute_capability"]:
        raise YoloslimError(
            f"this engine was built for a GPU of compute capability {built_on} ({own['device'].get('name', '?')}), "
            f"this one is {device['compute_capability']} ({device.get('name', '?')}); rebuild it on this device"
        )


class TensorRTBackend(HeadOutput):
    """Runs an engine: one pinned host and one device buffer per I/O tensor, by name; copy in, execute, copy out on a
    stream. close() releases everything in the reverse order of creation."""

    def __init__(self, path, cuda=None):
        from yoloslim.runtime.cuda import load_cuda

        trt = import_tensorrt()
        self.cuda = cuda or load_cuda()
        meta, plan = read_engine_file(path)
        check_engine_compatible(meta, trt.__version__, self.cuda.device())
        self.meta = meta
        self.names: Dict[int, str] = {int(k): v for k, v in (meta.get("names") or {}).items()}
        self.head = head_kind(meta)
        self.logger = trt.Logger(trt.Logger.WARNING)  # TensorRT keeps a pointer to it: it must outlive the runtime
        self.runtime = trt.Runtime(self.logger)
        if yoloslim_metadata(meta).get("version_compatible"):
            self.runtime.engine_host_code_allowed = True  # the plan carries the lean runtime that runs it
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise YoloslimError(
                f"TensorRT {trt.__version__} cannot load {path}: built by another TensorRT version or for another "
                "GPU; rebuild it on this device"
            )
        self.context = self.engine.create_execution_context()
        self.host, self.device = {}, {}
        self.stream = self.cuda.stream()
        try:
            self._allocate_io(trt)
            # buffers hold the largest input the engine takes, and __call__ runs that height and width only
            self.fixed_imgsz = int(self.host[self.inputs[0]].shape[2])
            check_output_shape(self.host[self.outputs[0]].shape, self.head, len(self.names), Path(path).name)
        except BaseException:  # an engine this runtime cannot serve still gives back what it was given
            self.close()
            raise

    def _allocate_io(self, trt) -> None:
        """A pinned host and a device buffer per I/O tensor, inputs at their (largest) shape first, since the
        outputs' shapes follow from the inputs'."""
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        for name in self.inputs:
            shape = tuple(self.engine.get_tensor_shape(name))
            if -1 in shape:  # dynamic: buffers for the profile's largest input, which the context needs to size outputs
                shape = tuple(self.engine.get_tensor_profile_shape(name, 0)[2])
                self._set_input_shape(name, shape)
            self._allocate(name, shape)
        for name in self.outputs:  # every dimension follows from the inputs', the anchors too when H and W are open
            shape = tuple(self.context.get_tensor_shape(name))
            if -1 in shape:
                raise YoloslimError(
                    f"output {name} of this engine has a shape that depends on the data {shape}; yoloslim runs "
                    "engines whose outputs follow from the input shape, as yoloslim export writes them"
                )
            self._allocate(name, shape)

    def _allocate(self, name: str, shape: Tuple[int, ...]) -> None:
        self.host[name] = self.cuda.host_empty(shape, numpy_dtype(self.engine.get_tensor_dtype(name)))
        self.device[name] = self.cuda.malloc(self.host[name].nbytes)
        self.context.set_tensor_address(name, self.device[name])

    def _set_input_shape(self, name: str, shape: Tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):
            raise YoloslimError(
                f"this engine does not take input {name} of shape {shape}; "
                "rebuild it for that shape with yoloslim export --format engine"
            )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.stream is None:
            raise YoloslimError("this TensorRT backend was closed; load the engine again")
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
        return nms_layout(host_out.astype(np.float32, copy=True), self.head)

    def close(self) -> None:
        """The context before its engine, the engine before its runtime (TensorRT's object lifetimes), then the
        buffers the context pointed at, then the stream. Safe to call twice."""
        if self.stream is None:
            return
        self.cuda.synchronize(self.stream)
        self.context = None
        self.engine = None
        self.runtime = None
        for ptr in self.device.values():
            self.cuda.free(ptr)
        for array in self.host.values():
            self.cuda.free_host(array)
        self.device.clear()
        self.host.clear()
        self.cuda.destroy_stream(self.stream)
        self.stream = None
