"""A stand-in for the `tensorrt` module, at the hardware boundary only.

It records what yoloslim's builder asks of TensorRT (network flags, builder flags, profiles, timing cache) for a
given TensorRT version, and exposes only the API that version has (TensorRT 11 has no FP16/INT8 builder flags, so
touching them raises AttributeError as the real module would). Its "network" is read from the real ONNX with the
onnx package, so Q/DQ and FP16 content are real. It builds nothing: passing tests here prove the version logic and
the file format, never that an engine works. Real engine tests are marked `jetson`.
"""

from __future__ import annotations

import json
import types
from enum import IntEnum

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
        self.type, self.num_outputs, self._out = op, len(node.output), Tensor(node.output[0] if node.output else "", (), dtype)

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
        self.cache = cache

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
        record = {"network_flags": network.flags, "builder_flags": config.flags, "pools": config.pools,
                  "profiles": [p.shapes for p in config.profiles]}
        self.trt.calls.append(record)
        return b"STANDIN-PLAN" + json.dumps(record, default=list).encode()
