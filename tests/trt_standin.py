"""A stand-in for the `tensorrt` module and the CUDA binding, at the hardware boundary only; never proof of an engine.

It behaves like the real bindings of a given TensorRT version where yoloslim's version logic lives, each point taken
from NVIDIA's sources:

- API per version: 11 has no EXPLICIT_BATCH network flag and no FP16/INT8 builder flags (touching them raises
  AttributeError, as the real module would), no `ILayer.output_type_is_set`; 8.5 has no VERSION_COMPATIBLE flag.
- `nptype` of TensorRT before 8.5.3 builds its table with `np.bool` (python/packaging/tensorrt/__init__.py at the
  8.5.1 release), so on the numpy a JetPack 5 device gets (1.24, the newest for Python 3.8) it raises AttributeError.
- The ONNX parser (read from the real ONNX with the onnx package, so Q/DQ and FP16 content are real): Cast is an
  ICastLayer from 8.6 on and, in 8.5, an identity layer with its output type set while its output tensor keeps the
  input's type (onnx-tensorrt release/8.5-GA builtin_op_importers.cpp); non-positive Q/DQ scales are refused.
- Building: a network with an open input dimension and no optimization profile for it gives no plan (None).
- Timing caches: `create_timing_cache` gives None for a blob from another TensorRT version, `set_timing_cache` False
  for one from another GPU and TypeError for None (pybind11 rejects it).
- Runtime: an engine reports -1 for every dynamic dimension, an input shape outside the profile is refused with
  False, a context resolves its outputs' shapes only once its inputs' are set; a plan from another TensorRT version
  deserialises only if it is version-compatible and host code is allowed. "Execution" writes a known function of each
  input image into the output buffer (expected_output) and fails where the real engine would write past a buffer.
- Object lifetimes and copies: releases are logged (context, engine, runtime, then buffers and stream); StandinCuda
  refuses an asynchronous copy from or to host memory that is not page-locked (it would be synchronous).

It builds nothing: passing tests here prove the version logic, the bookkeeping and the file format, never TensorRT's
kernels. Real engine tests are in test_jetson_device.py, marked `jetson`.
"""

from __future__ import annotations

import importlib.machinery
import json
import types
from enum import Enum, IntEnum

import numpy as np
import onnx
from onnx import numpy_helper

NUMPY_ON_JETPACK_5 = (1, 24, 4)  # pip's numpy for JetPack 5's Python 3.8 (numpy 1.25 needs Python 3.9)
GPU = "8.7"  # the stand-in device's compute capability (Orin)
STRIDES = (8, 16, 32)
ONNX_TO_TRT = {
    onnx.TensorProto.FLOAT: "FLOAT",
    onnx.TensorProto.FLOAT16: "HALF",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.UINT8: "UINT8",
}


def make_tensorrt(version: str, numpy_version=NUMPY_ON_JETPACK_5) -> types.ModuleType:
    release = tuple(int(p) for p in version.split("."))
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # found, as an installed module is
    trt.__version__ = version
    flags = {"EXPLICIT_BATCH": 0} if release[0] < 11 else {}
    if release[0] >= 10:
        flags["STRONGLY_TYPED"] = 5
    trt.NetworkDefinitionCreationFlag = IntEnum("NetworkDefinitionCreationFlag", flags)
    trt.DataType = Enum("DataType", [*ONNX_TO_TRT.values()])
    layer_types = ["QUANTIZE", "DEQUANTIZE", "IDENTITY", "OTHER"] + (["CAST"] if release >= (8, 6) else [])
    trt.LayerType = Enum("LayerType", layer_types)
    trt.Logger = type("Logger", (), {"WARNING": 2, "INFO": 3, "__init__": lambda self, level=2: None})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    builder_flags = {"VERSION_COMPATIBLE": "VERSION_COMPATIBLE"} if release >= (8, 6) else {}
    if release[0] < 11:
        builder_flags.update(FP16="FP16", INT8="INT8")
    trt.BuilderFlag = types.SimpleNamespace(**builder_flags)
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.nptype = _nptype(release, numpy_version)
    trt.Builder = lambda logger: Builder(trt)
    trt.OnnxParser = lambda network, logger: Parser(trt, network)
    trt.Runtime = lambda logger: Runtime(trt)
    trt.release = release
    trt.memory = {}  # the stand-in GPU's memory, shared with StandinCuda
    trt.calls = []  # what the builder did, for the tests
    trt.released = []  # what was released, in order
    return trt


def _nptype(release, numpy_version):
    def nptype(dtype):
        if release < (8, 5, 3) and (1, 24) <= tuple(numpy_version)[:2] < (2, 0):
            raise AttributeError("module 'numpy' has no attribute 'bool'.")  # `bool: np.bool` in its table
        return {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32}[dtype.name]

    return nptype


# -- building -------------------------------------------------------------------------------------------------------


class Tensor:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, shape, dtype


class Layer:
    def __init__(self, trt, kind, outputs, output_type=None):
        self.type, self._outputs, self._output_type = trt.LayerType[kind], outputs, output_type
        if trt.release[0] < 11:
            self.output_type_is_set = lambda i: self._output_type is not None

    num_outputs = property(lambda self: len(self._outputs))

    def get_output(self, i):
        return self._outputs[i]

    def get_output_type(self, i):
        return self._output_type or self._outputs[i].dtype


class Network:
    def __init__(self, flags):
        self.flags, self.inputs, self.layers, self.output_channels = flags, [], [], None

    num_inputs = property(lambda self: len(self.inputs))
    num_layers = property(lambda self: len(self.layers))
    get_input = lambda self, i: self.inputs[i]  # noqa: E731
    get_layer = lambda self, i: self.layers[i]  # noqa: E731


class Parser:
    def __init__(self, trt, network):
        self.trt, self.network, self.errors = trt, network, []

    num_errors = property(lambda self: len(self.errors))

    def get_error(self, i):
        return self.errors[i]

    def parse(self, data: bytes) -> bool:
        graph = onnx.load_from_string(data).graph
        init = {t.name: t for t in graph.initializer}
        types_ = {name: self.trt.DataType[ONNX_TO_TRT[t.data_type]] for name, t in init.items()}
        for value in graph.input:
            shape = tuple(d.dim_value if d.dim_value else -1 for d in value.type.tensor_type.shape.dim)
            types_[value.name] = self.trt.DataType[ONNX_TO_TRT[value.type.tensor_type.elem_type]]
            self.network.inputs.append(Tensor(value.name, shape, types_[value.name]))
        for node in graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and not self._scale_positive(node, init):
                self.errors.append(f"{node.name}: Scale coefficients must all be positive")
                return False
            self.network.layers.append(self._layer(node, types_))
        self.network.output_channels = graph.output[0].type.tensor_type.shape.dim[1].dim_value
        return True

    @staticmethod
    def _scale_positive(node, init) -> bool:
        scale = init.get(node.input[1])
        return scale is None or bool(np.all(numpy_helper.to_array(scale) > 0))

    def _layer(self, node, types_):
        trt = self.trt
        first = types_.get(node.input[0], trt.DataType.FLOAT) if node.input else trt.DataType.FLOAT
        kind, output_type, dtype = "OTHER", None, first
        if node.op_type == "Cast":
            to = trt.DataType[ONNX_TO_TRT[next(a.i for a in node.attribute if a.name == "to")]]
            if trt.release < (8, 6):
                kind, output_type = "IDENTITY", to  # the output tensor keeps the input's type until the build
            else:
                kind, dtype = "CAST", to
        elif node.op_type == "QuantizeLinear":
            kind, dtype = "QUANTIZE", trt.DataType.INT8
        elif node.op_type == "DequantizeLinear":
            kind, dtype = "DEQUANTIZE", types_[node.input[1]]
        elif node.op_type == "Constant":
            dtype = trt.DataType[ONNX_TO_TRT[node.attribute[0].t.data_type]]
        outputs = [Tensor(name, (), dtype) for name in node.output]
        types_.update({name: dtype for name in node.output})
        return Layer(trt, kind, outputs, output_type)


class Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, min_shape, opt_shape, max_shape):
        self.shapes[name] = (min_shape, opt_shape, max_shape)


def timing_cache_blob(version: str, gpu: str = GPU, entries: bytes = b"") -> bytes:
    """A serialised stand-in timing cache: which TensorRT and GPU it was timed on, then its entries."""
    return f"STANDIN-TIMING-CACHE {version} {gpu}\n".encode() + entries


class Cache:
    def __init__(self, version, gpu, entries):
        self.version, self.gpu, self.entries = version, gpu, entries

    def serialize(self):
        return timing_cache_blob(self.version, self.gpu, self.entries)


class Config:
    def __init__(self, trt):
        self.trt, self.flags, self.pools, self.profiles, self.cache = trt, [], {}, [], None

    def set_flag(self, flag):
        self.flags.append(flag)

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def create_timing_cache(self, data):
        if not data:
            return Cache(self.trt.__version__, GPU, b"")
        header, _, entries = bytes(data).partition(b"\n")
        tag, version, gpu = (header.decode(errors="replace").split(" ") + ["", ""])[:3]
        if tag != "STANDIN-TIMING-CACHE" or version != self.trt.__version__:
            return None  # TensorRT cannot deserialise another version's cache
        return Cache(version, gpu, entries)

    def set_timing_cache(self, cache, ignore_mismatch):
        if not isinstance(cache, Cache):
            raise TypeError("set_timing_cache(): incompatible function arguments")
        if cache.gpu != GPU and not ignore_mismatch:
            return False  # a cache timed on another GPU
        self.cache = cache
        return True


class Builder:
    def __init__(self, trt):
        self.trt = trt

    def create_network(self, flags):
        known = sum(1 << flag.value for flag in self.trt.NetworkDefinitionCreationFlag)
        if flags & ~known:
            raise ValueError(f"stand-in TensorRT {self.trt.__version__}: unknown network flags {flags}")
        return Network(flags)

    def create_builder_config(self):
        return Config(self.trt)

    def create_optimization_profile(self):
        return Profile()

    def build_serialized_network(self, network, config):
        record = {
            "network_flags": network.flags,
            "builder_flags": config.flags,
            "pools": config.pools,
            "profiles": [p.shapes for p in config.profiles],
        }
        self.trt.calls.append(record)
        if config.cache is not None:
            config.cache.entries += b"+timed"
        tensor = network.get_input(0)
        profile = config.profiles[0].shapes.get(tensor.name) if config.profiles else None
        if -1 in tensor.shape and profile is None:
            return None  # "Network has dynamic or shape inputs, but no optimization profile has been defined."
        compatible = "VERSION_COMPATIBLE" in config.flags
        return engine_plan(tensor.shape, profile, network.output_channels, self.trt.__version__, compatible)


# -- running --------------------------------------------------------------------------------------------------------


def engine_plan(input_shape, profile=None, channels=5, version=None, version_compatible=False) -> bytes:
    """A stand-in engine: one input `images` (dynamic dimensions -1, with a (min, opt, max) profile) and one output
    `output0` (batch, channels, anchors), anchors following the input's height and width as in a YOLO detector."""
    spec = {
        "input": list(input_shape),
        "profile": profile,
        "channels": channels,
        "version": version,
        "version_compatible": version_compatible,
    }
    return b"STANDIN-ENGINE" + json.dumps(spec).encode()


def expected_output(images: np.ndarray, channels: int = 5) -> np.ndarray:
    """What the stand-in engine computes: each image's mean plus the channel index, at every anchor."""
    anchors = sum((images.shape[2] // s) * (images.shape[3] // s) for s in STRIDES)
    means = images.reshape(len(images), -1).mean(axis=1)
    return np.broadcast_to((means[:, None] + np.arange(channels))[:, :, None], (len(images), channels, anchors)).astype(
        np.float32
    )


class Runtime:
    def __init__(self, trt):
        self.trt, self.engine_host_code_allowed = trt, False

    def deserialize_cuda_engine(self, plan: bytes):
        spec = json.loads(bytes(plan)[len(b"STANDIN-ENGINE") :])
        other = spec["version"] not in (None, self.trt.__version__)
        if other and not (spec["version_compatible"] and self.engine_host_code_allowed):
            return None  # TensorRT refuses another version's plan
        return Engine(self.trt, spec)

    def __del__(self):
        self.trt.released.append("runtime")


class Engine:
    def __init__(self, trt, spec):
        self.trt, self.spec = trt, spec
        self.num_io_tensors = 2

    def get_tensor_name(self, i):
        return ("images", "output0")[i]

    def get_tensor_mode(self, name):
        return "INPUT" if name == "images" else "OUTPUT"

    def get_tensor_shape(self, name):
        batch, _, height, width = self.spec["input"]
        if name == "images":
            return tuple(self.spec["input"])
        return (batch, self.spec["channels"], -1 if -1 in (height, width) else _anchors(height, width))

    def get_tensor_profile_shape(self, name, profile_index):
        return [tuple(shape) for shape in self.spec["profile"] or [self.spec["input"]] * 3]

    def get_tensor_dtype(self, name):
        return self.trt.DataType.FLOAT

    def create_execution_context(self):
        return Context(self)

    def __del__(self):
        self.trt.released.append("engine")


class Context:
    def __init__(self, engine):
        self.trt, self.spec, self.addresses = engine.trt, engine.spec, {}
        self.input_shape = None if -1 in self.spec["input"] else tuple(self.spec["input"])

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def set_input_shape(self, name, shape):
        shape = tuple(shape)
        lowest, _, highest = self.spec["profile"] or (self.spec["input"],) * 3
        if len(shape) != len(lowest) or any(not lo <= d <= hi for d, lo, hi in zip(shape, lowest, highest)):
            return False
        self.input_shape = shape
        return True

    def get_tensor_shape(self, name):
        if self.input_shape is None:
            return Engine.get_tensor_shape(self, name)
        batch, _, height, width = self.input_shape
        return self.input_shape if name == "images" else (batch, self.spec["channels"], _anchors(height, width))

    def execute_async_v3(self, stream):
        memory = self.trt.memory
        count = int(np.prod(self.input_shape))
        images = np.frombuffer(memory[self.addresses["images"]], dtype=np.float32, count=count)
        result = expected_output(images.reshape(self.input_shape), self.spec["channels"])
        buffer = memory[self.addresses["output0"]]
        if result.nbytes > len(buffer):  # a real engine would write past the allocation here
            raise AssertionError(f"stand-in: output0 needs {result.nbytes} bytes, its buffer has {len(buffer)}")
        buffer[: result.nbytes] = result.tobytes()
        return True

    def __del__(self):
        self.trt.released.append("context")


def _anchors(height, width):
    return sum((height // s) * (width // s) for s in STRIDES)


class StandinCuda:
    """Device memory as host byte arrays, with the interface of yoloslim.runtime.cuda's bindings."""

    distribution = "stand-in"
    distributions = ("stand-in",)

    def __init__(self, trt):
        self.trt, self.memory, self.streams, self.pinned = trt, trt.memory, 0, []

    def host_empty(self, shape, dtype):
        array = np.zeros(shape, dtype)
        self.pinned.append(array)
        return array

    def free_host(self, array):
        self.pinned = [a for a in self.pinned if a is not array]
        self.trt.released.append("host buffer")

    def _check_pinned(self, host):
        if not any(np.shares_memory(host, array) for array in self.pinned):
            raise AssertionError("stand-in: an async copy with pageable host memory is synchronous")

    def malloc(self, nbytes):
        ptr = len(self.memory) + 1
        self.memory[ptr] = bytearray(nbytes)
        return ptr

    def free(self, ptr):
        del self.memory[ptr]
        self.trt.released.append("device buffer")

    def stream(self):
        self.streams += 1
        return self.streams

    def destroy_stream(self, stream):
        self.trt.released.append("stream")

    def to_device(self, ptr, host, stream):
        self._check_pinned(host)
        data = np.ascontiguousarray(host).tobytes()
        self.memory[ptr][: len(data)] = data

    def to_host(self, host, ptr, stream):
        self._check_pinned(host)
        host[...] = np.frombuffer(self.memory[ptr], dtype=host.dtype, count=host.size).reshape(host.shape)

    def synchronize(self, stream):
        pass

    def device(self):
        return {"name": "stand-in", "compute_capability": GPU}
