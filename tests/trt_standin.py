"""A stand-in for the `tensorrt` module, at the hardware boundary only.

It records what yoloslim's builder asks of TensorRT (network flags, builder flags, profiles, timing cache) for a
given TensorRT version, and exposes only the API that version has (TensorRT 11 has no FP16/INT8 builder flags, so
touching them raises AttributeError as the real module would). Its "network" is read from the real ONNX with the
onnx package, so Q/DQ and FP16 content are real. It builds nothing: passing tests here prove the version logic and
the file format, never that an engine works. Real engine tests are marked `jetson`.

Its runtime side (Runtime, engine, execution context, and `StandinCuda` for device memory) follows TensorRT's
shape rules: an engine reports -1 for every dynamic dimension, an input shape outside the profile is refused with
False, and a context resolves its outputs' shapes only once its inputs' are set. "Execution" writes a known function
of each input image into the output buffer and fails where the real engine would write past a buffer too small. It
proves yoloslim's buffer bookkeeping, not TensorRT's kernels.
"""

from __future__ import annotations

import json
import types
from enum import IntEnum

import numpy as np
import onnx


class _Flags(IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 5


def make_tensorrt(version: str) -> types.ModuleType:
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.NetworkDefinitionCreationFlag = _Flags
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.DataType = types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF", INT8="INT8")
    trt.LayerType = types.SimpleNamespace(QUANTIZE="QUANTIZE", DEQUANTIZE="DEQUANTIZE", OTHER="OTHER")
    flags = {"VERSION_COMPATIBLE": "VERSION_COMPATIBLE"}
    if major < 11:
        flags.update(FP16="FP16", INT8="INT8")
    trt.BuilderFlag = types.SimpleNamespace(**flags)
    trt.Builder = lambda logger: Builder(major)
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.nptype = {"FLOAT": np.float32, "HALF": np.float16}.__getitem__
    trt.memory = {}  # the stand-in GPU's memory, shared with StandinCuda
    trt.Runtime = lambda logger: Runtime(trt.memory)
    trt.OnnxParser = Parser
    trt.calls = []  # what the builder did, for the tests
    Builder.trt = trt
    return trt


class Tensor:
    def __init__(self, name, shape, dtype="FLOAT"):
        self.name, self.shape, self.dtype = name, shape, dtype


class Layer:
    def __init__(self, node, dtype):
        op = {"QuantizeLinear": "QUANTIZE", "DequantizeLinear": "DEQUANTIZE"}.get(node.op_type, "OTHER")
        self.type, self.num_outputs, self._out = (
            op,
            len(node.output),
            Tensor(node.output[0] if node.output else "", (), dtype),
        )

    def get_output(self, i):
        return self._out


class Network:
    def __init__(self, flags):
        self.flags, self.inputs, self.layers = flags, [], []

    num_inputs = property(lambda self: len(self.inputs))
    num_layers = property(lambda self: len(self.layers))
    get_input = lambda self, i: self.inputs[i]  # noqa: E731
    get_layer = lambda self, i: self.layers[i]  # noqa: E731


class Parser:
    num_errors = 0

    def __init__(self, network, logger):
        self.network = network

    def parse(self, data: bytes) -> bool:
        model = onnx.load_from_string(data)
        half = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
        for value in model.graph.input:
            shape = tuple(d.dim_value if d.dim_value else -1 for d in value.type.tensor_type.shape.dim)
            self.network.inputs.append(Tensor(value.name, shape))
        self.network.layers = [Layer(n, "HALF" if half else "FLOAT") for n in model.graph.node]
        return True


class Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, min_shape, opt_shape, max_shape):
        self.shapes[name] = (min_shape, opt_shape, max_shape)


class Cache:
    def __init__(self, data):
        self.data = data

    def serialize(self):
        return self.data + b"+timed"


class Config:
    def __init__(self):
        self.flags, self.pools, self.profiles, self.cache = [], {}, [], None

    def set_flag(self, flag):
        self.flags.append(flag)

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def create_timing_cache(self, data):
        return Cache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.data.startswith(b"OTHER-GPU") and not ignore_mismatch:
            return False  # TensorRT refuses a cache from another device or version
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class Builder:
    trt = None

    def __init__(self, major):
        self.major = major

    def create_network(self, flags):
        return Network(flags)

    def create_builder_config(self):
        return Config()

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
        return b"STANDIN-PLAN" + json.dumps(record, default=list).encode()


STRIDES = (8, 16, 32)


def engine_plan(input_shape, profile=None, channels=5) -> bytes:
    """A stand-in engine: one input `images` (dynamic dimensions -1, with a (min, opt, max) profile) and one output
    `output0` (batch, channels, anchors), anchors following the input's height and width as in a YOLO detector."""
    spec = {"input": list(input_shape), "profile": profile, "channels": channels}
    return b"STANDIN-ENGINE" + json.dumps(spec).encode()


def expected_output(images: np.ndarray, channels: int = 5) -> np.ndarray:
    """What the stand-in engine computes: each image's mean plus the channel index, at every anchor."""
    anchors = sum((images.shape[2] // s) * (images.shape[3] // s) for s in STRIDES)
    means = images.reshape(len(images), -1).mean(axis=1)
    return np.broadcast_to((means[:, None] + np.arange(channels))[:, :, None], (len(images), channels, anchors)).astype(
        np.float32
    )


class Runtime:
    def __init__(self, memory):
        self.memory = memory

    def deserialize_cuda_engine(self, plan: bytes):
        return Engine(json.loads(plan.removeprefix(b"STANDIN-ENGINE")), self.memory)


class Engine:
    def __init__(self, spec, memory):
        self.spec, self.memory = spec, memory
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
        return [tuple(shape) for shape in self.spec["profile"]]

    def get_tensor_dtype(self, name):
        return "FLOAT"

    def create_execution_context(self):
        return Context(self)


class Context:
    def __init__(self, engine):
        self.engine, self.addresses = engine, {}
        self.input_shape = None if -1 in engine.spec["input"] else tuple(engine.spec["input"])

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def set_input_shape(self, name, shape):
        shape = tuple(shape)
        lowest, _, highest = self.engine.spec["profile"] or (self.engine.spec["input"],) * 3
        if len(shape) != len(lowest) or any(not lo <= d <= hi for d, lo, hi in zip(shape, lowest, highest)):
            return False
        self.input_shape = shape
        return True

    def get_tensor_shape(self, name):
        if self.input_shape is None:
            return self.engine.get_tensor_shape(name)
        batch, _, height, width = self.input_shape
        return self.input_shape if name == "images" else (batch, self.engine.spec["channels"], _anchors(height, width))

    def execute_async_v3(self, stream):
        count = int(np.prod(self.input_shape))
        images = np.frombuffer(self.engine.memory[self.addresses["images"]], dtype=np.float32, count=count).reshape(
            self.input_shape
        )
        result = expected_output(images, self.engine.spec["channels"])
        buffer = self.engine.memory[self.addresses["output0"]]
        if result.nbytes > len(buffer):  # a real engine would write past the allocation here
            raise AssertionError(f"stand-in: output0 needs {result.nbytes} bytes, its buffer has {len(buffer)}")
        buffer[: result.nbytes] = result.tobytes()
        return True


def _anchors(height, width):
    return sum((height // s) * (width // s) for s in STRIDES)


class StandinCuda:
    """Device memory as host byte arrays, with the interface of yoloslim.runtime.cuda."""

    def __init__(self, memory):
        self.memory, self.streams = memory, 0

    def malloc(self, nbytes):
        ptr = len(self.memory) + 1
        self.memory[ptr] = bytearray(nbytes)
        return ptr

    def free(self, ptr):
        del self.memory[ptr]

    def stream(self):
        self.streams += 1
        return self.streams

    def destroy_stream(self, stream):
        pass

    def to_device(self, ptr, host, stream):
        data = np.ascontiguousarray(host).tobytes()
        self.memory[ptr][: len(data)] = data

    def to_host(self, host, ptr, stream):
        host[...] = np.frombuffer(self.memory[ptr], dtype=host.dtype, count=host.size).reshape(host.shape)

    def synchronize(self, stream):
        pass

    def device(self):
        return {"name": "stand-in", "compute_capability": "8.7"}
