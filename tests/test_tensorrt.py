"""The TensorRT side without TensorRT: version logic, buffers, lifetimes and reports against a stand-in of the
TensorRT and CUDA bindings (tests/trt_standin.py; it proves the calls, never an engine), the engine file format and
Ultralytics' reading of it for real. Real engines are tested on a device by test_jetson_device.py."""

import contextlib
import enum
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from trt_standin import GPU, StandinCuda, engine_plan, expected_output, make_tensorrt, timing_cache_blob

from yoloslim.runtime import cuda as cuda_module
from yoloslim.runtime.doctor import ASSETS, SELFTEST_ONNX
from yoloslim.runtime.engine_file import read_engine_file, read_engine_header, write_engine_file
from yoloslim.runtime.onnx_meta import read_onnx_metadata
from yoloslim.runtime.tensorrt import TensorRTBackend, build_engine, check_engine_compatible
from yoloslim.utils.errors import YoloslimError

ROOT = Path(__file__).resolve().parents[1]
SELFTEST = {
    "fp32": ASSETS / "selftest.onnx",
    "fp16": ASSETS / "selftest-fp16.onnx",
    "int8": ASSETS / "selftest-int8.onnx",
}
ORIN = {"name": "Orin", "compute_capability": "8.7"}


@pytest.fixture(scope="module")
def dynamic_onnx(tmp_path_factory):
    """The shipped FP32 self-test ONNX with batch, height and width left open, as Ultralytics' dynamic export does."""
    model = onnx.load(str(SELFTEST["fp32"]))
    for value, names in (
        (model.graph.input[0], ("batch", None, "height", "width")),
        (model.graph.output[0], ("batch", None, "anchors")),
    ):
        for dim, name in zip(value.type.tensor_type.shape.dim, names):
            if name:
                dim.dim_param = name
    path = tmp_path_factory.mktemp("onnx") / "dynamic.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture
def standin(monkeypatch, request):
    trt = make_tensorrt(request.param)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


EXPECTED_FLAGS = {  # (version, precision) -> builder flags; versions as JetPack ships them
    ("8.5.2.2", "fp32"): [],
    ("8.5.2.2", "fp16"): ["FP16"],
    ("8.5.2.2", "int8"): ["FP16", "INT8"],
    ("8.6.2.3", "fp16"): ["FP16"],
    ("8.6.2.3", "int8"): ["FP16", "INT8"],
    ("10.3.0.30", "fp32"): [],
    ("10.3.0.30", "fp16"): ["FP16"],
    ("10.3.0.30", "int8"): ["FP16", "INT8"],
    ("11.4.1", "fp32"): [],
    ("11.4.1", "fp16"): [],
    ("11.4.1", "int8"): [],
}


@pytest.mark.parametrize("standin,precision", list(EXPECTED_FLAGS), indirect=["standin"])
def test_builder_uses_each_versions_api(standin, precision, tmp_path):
    eleven = standin.__version__.startswith("11.")
    source = SELFTEST["fp16" if precision == "fp16" and eleven else precision]
    out = build_engine(source, out=tmp_path / "m.engine", precision=precision, timing_cache=tmp_path / "cache")
    record = standin.calls[-1]
    assert record["builder_flags"] == EXPECTED_FLAGS[(standin.__version__, precision)]
    assert record["network_flags"] == (1 << 0 if standin.__version__.startswith("8.") else 0)
    assert record["pools"]["WORKSPACE"] == 2 << 30
    assert (tmp_path / "cache").read_bytes() == timing_cache_blob(standin.__version__, GPU, b"+timed")
    meta, plan = read_engine_file(out)
    assert plan.startswith(b"STANDIN-ENGINE") and meta["names"] == {"0": "a", "1": "b"}
    assert meta["yoloslim"]["precision"] == precision and meta["yoloslim"]["tensorrt"] == standin.__version__


@pytest.mark.parametrize(
    "standin,source,float_layers",
    [
        ("10.3.0.30", "int8", "fp16 or fp32, TensorRT's choice per layer"),
        ("11.4.1", "int8", "fp32"),  # strongly typed: the Q/DQ ONNX of the FP32 model keeps FP32 outside Q/DQ
        ("11.4.1", "fp16", "fp16 and fp32, as the ONNX types them"),
    ],
    indirect=["standin"],
)
def test_engines_record_what_their_float_layers_run_in(standin, source, float_layers, tmp_path):
    out = build_engine(SELFTEST[source], out=tmp_path / "m.engine", precision=source)
    assert read_engine_file(out)[0]["yoloslim"]["float_layers"] == float_layers


@pytest.mark.parametrize("standin", ["8.6.2.3", "10.3.0.30", "11.4.1"], indirect=True)
def test_int8_needs_a_qdq_onnx(standin, tmp_path):
    with pytest.raises(YoloslimError, match="Q/DQ ONNX"):
        build_engine(SELFTEST["fp32"], out=tmp_path / "m.engine", precision="int8")


@pytest.mark.parametrize("standin", ["8.6.2.3", "10.3.0.30", "11.4.1"], indirect=True)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_qdq_onnx_builds_only_int8(standin, precision, tmp_path):
    with pytest.raises(YoloslimError, match="--precision int8"):
        build_engine(SELFTEST["int8"], out=tmp_path / "m.engine", precision=precision)


@pytest.mark.parametrize("standin", ["11.4.1"], indirect=True)
def test_tensorrt_11_builds_fp16_only_from_an_fp16_onnx(standin, tmp_path):
    with pytest.raises(YoloslimError, match="FP16 ONNX"):
        build_engine(SELFTEST["fp32"], out=tmp_path / "m.engine", precision="fp16")


@pytest.mark.parametrize("standin", ["8.5.2.2", "8.6.2.3", "10.3.0.30", "11.4.1"], indirect=True)
def test_an_fp16_onnx_is_recognised_however_the_parser_reads_cast(standin, tmp_path):
    """TensorRT 8.5 parses Cast as an identity layer whose output type is set but whose tensor keeps FP32."""
    with pytest.raises(YoloslimError, match="holds FP16 weights"):
        build_engine(SELFTEST["fp16"], out=tmp_path / "m.engine", precision="fp32")
    build_engine(SELFTEST["fp16"], out=tmp_path / "m.engine", precision="fp16")


@pytest.mark.parametrize("standin", ["8.5.2.2", "8.6.2.3"], indirect=True)
def test_standin_parses_cast_as_that_tensorrt_does(standin):
    network = standin.Builder(None).create_network(1)
    assert standin.OnnxParser(network, None).parse(SELFTEST["fp16"].read_bytes())
    casts = [network.get_layer(i) for i in range(network.num_layers)]
    if standin.__version__.startswith("8.5"):
        casts = [c for c in casts if c.type == standin.LayerType.IDENTITY]
        assert casts and not hasattr(standin.LayerType, "CAST")
        half = [c for c in casts if c.output_type_is_set(0) and c.get_output_type(0) == standin.DataType.HALF]
        assert half and all(c.get_output(0).dtype == standin.DataType.FLOAT for c in half)
    else:
        casts = [c for c in casts if c.type == standin.LayerType.CAST]
        assert any(c.get_output(0).dtype == standin.DataType.HALF for c in casts)


@pytest.mark.parametrize("standin", ["10.3.0.30"], indirect=True)
def test_a_non_positive_qdq_scale_is_refused_by_the_parser(standin, tmp_path):
    """onnx-tensorrt asserts 'Scale coefficients must all be positive' (8.5 to 10); the message reaches the user."""
    model = onnx.load(str(SELFTEST["int8"]))
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    scale = next(t for t in model.graph.initializer if t.name == node.input[1])
    scale.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(scale)), scale.name))
    onnx.save(model, str(tmp_path / "zero.onnx"))
    with pytest.raises(YoloslimError, match="cannot parse .* Scale coefficients must all be positive"):
        build_engine(tmp_path / "zero.onnx", out=tmp_path / "m.engine", precision="int8")


@pytest.mark.parametrize("standin", ["10.3.0.30"], indirect=True)
@pytest.mark.parametrize("cache", [timing_cache_blob("8.6.2.3"), timing_cache_blob("10.3.0.30", gpu="7.2"), b"junk"])
def test_a_timing_cache_from_another_tensorrt_or_gpu_is_replaced_not_fatal(standin, cache, tmp_path):
    (tmp_path / "cache").write_bytes(cache)
    build_engine(SELFTEST["fp32"], out=tmp_path / "m.engine", precision="fp16", timing_cache=tmp_path / "cache")
    assert (tmp_path / "cache").read_bytes() == timing_cache_blob("10.3.0.30", GPU, b"+timed")


@pytest.mark.parametrize("standin", ["10.3.0.30"], indirect=True)
def test_a_timing_cache_of_this_device_is_reused(standin, tmp_path):
    (tmp_path / "cache").write_bytes(timing_cache_blob("10.3.0.30", GPU, b"+earlier"))
    build_engine(SELFTEST["fp32"], out=tmp_path / "m.engine", precision="fp16", timing_cache=tmp_path / "cache")
    assert (tmp_path / "cache").read_bytes() == timing_cache_blob("10.3.0.30", GPU, b"+earlier+timed")


@pytest.mark.parametrize("standin", ["10.3.0.30"], indirect=True)
def test_the_engine_never_overwrites_its_onnx(standin, tmp_path):
    source = tmp_path / "m.onnx"
    source.write_bytes(SELFTEST["fp32"].read_bytes())
    with pytest.raises(YoloslimError, match="is the input file"):
        build_engine(source, out=source, precision="fp16")
    assert source.read_bytes() == SELFTEST["fp32"].read_bytes()


@pytest.mark.parametrize("standin", ["8.5.2.2", "10.3.0.30"], indirect=True)
def test_dynamic_batch_gets_an_optimization_profile(standin, dynamic_onnx, tmp_path):
    out = build_engine(dynamic_onnx, out=tmp_path / "d.engine", precision="fp16", batch=(1, 4, 8))
    (profile,) = standin.calls[-1]["profiles"]
    assert profile["images"] == ((1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64))
    meta, _ = read_engine_file(out)
    assert meta["yoloslim"]["dynamic"] is True and meta["batch"] == 8


@pytest.mark.parametrize("standin", ["8.5.2.2", "10.3.0.30"], indirect=True)
def test_an_open_image_size_with_a_fixed_batch_gets_a_profile(standin, tmp_path):
    """TensorRT builds a network with any open input dimension only with a profile: an ONNX that fixes the batch and
    leaves height and width open gets one at its batch and exported size."""
    model = onnx.load(str(SELFTEST["fp32"]))
    for dim in list(model.graph.input[0].type.tensor_type.shape.dim)[2:]:
        dim.dim_param = "size"
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_param = "anchors"
    onnx.save(model, str(tmp_path / "open-size.onnx"))
    out = build_engine(tmp_path / "open-size.onnx", out=tmp_path / "s.engine", precision="fp16", batch=(1, 4, 8))
    (profile,) = standin.calls[-1]["profiles"]
    assert profile["images"] == ((1, 3, 64, 64),) * 3
    meta, _ = read_engine_file(out)
    assert meta["yoloslim"]["dynamic"] is True and meta["batch"] == 1


@pytest.mark.parametrize("standin", ["10.3.0.30"], indirect=True)
def test_export_passes_its_engine_settings_to_the_builder(standin, dynamic_onnx, tmp_path, monkeypatch):
    from yoloslim.export import ExportConfig, export

    monkeypatch.setattr(cuda_module, "load_cuda", lambda: StandinCuda(standin))
    config = ExportConfig(
        format="engine", precision="fp16", dynamic=True, batch=2, max_batch=4, version_compatible=True
    )
    out = export(dynamic_onnx, config, out=tmp_path / "m.engine")
    record = standin.calls[-1]
    assert record["builder_flags"] == ["FP16", "VERSION_COMPATIBLE"]
    assert [shape[0] for shape in record["profiles"][0]["images"]] == [1, 2, 4]
    meta, _ = read_engine_file(out)
    assert meta["yoloslim"]["version_compatible"] is True and meta["yoloslim"]["device"]["name"] == "stand-in"


@pytest.mark.parametrize("standin", ["8.5.2.2"], indirect=True)
def test_version_compatible_needs_8_6(standin, tmp_path):
    with pytest.raises(YoloslimError, match="8.6"):
        build_engine(SELFTEST["fp32"], out=tmp_path / "m.engine", version_compatible=True)


def test_standin_nptype_fails_as_tensorrt_8_5_2_does_on_numpy_1_24():
    """TensorRT 8.5.2's trt.nptype evaluates np.bool, removed in numpy 1.24 (NVIDIA/TensorRT#2557)."""
    jetpack5 = make_tensorrt("8.5.2.2")
    with pytest.raises(AttributeError, match="np|numpy"):
        jetpack5.nptype(jetpack5.DataType.FLOAT)
    assert make_tensorrt("8.5.2.2", numpy_version=(1, 23, 5)).nptype(jetpack5.DataType.FLOAT) is np.float32
    assert make_tensorrt("8.6.2.3").nptype(jetpack5.DataType.FLOAT) is np.float32


@pytest.mark.parametrize("standin", ["8.5.2.2", "10.3.0.30"], indirect=True)
def test_runtime_sizes_buffers_from_the_profile_and_the_context(standin, tmp_path):
    """Ultralytics' dynamic export leaves batch, height and width open, so the engine reports the output as
    (-1, 5, -1): only the context, told the profile's largest input, knows the output's size. On 8.5.2 this also
    proves the buffers are typed without trt.nptype, which fails there on numpy 1.24."""
    plan = engine_plan((-1, 3, -1, -1), profile=[(1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64)])
    path = write_engine_file(tmp_path / "d.engine", plan, {"imgsz": [64, 64]})
    engine = TensorRTBackend(path, cuda=StandinCuda(standin))
    assert engine.host["output0"].shape == (8, 5, 84) and engine.host["output0"].dtype == np.float32
    assert engine.input_size() == 64 and engine.input_size(128) == 64  # its buffers: the one size it runs
    for n in (3, 8, 1):
        images = np.random.default_rng(n).random((n, 3, 64, 64), dtype=np.float32)
        np.testing.assert_allclose(engine(images), expected_output(images), rtol=1e-6)
    with pytest.raises(YoloslimError, match="up to 8 images shaped"):
        engine(np.zeros((9, 3, 64, 64), np.float32))
    with pytest.raises(YoloslimError, match="up to 8 images shaped"):
        engine(np.zeros((1, 3, 32, 32), np.float32))
    engine.close()
    assert standin.memory == {}


@pytest.mark.parametrize("standin", ["10.3.0.30"], indirect=True)
def test_runtime_copies_through_page_locked_buffers(standin, tmp_path):
    """Pageable host memory makes cudaMemcpyAsync synchronous; every I/O buffer is page-locked, as in NVIDIA's
    samples (the stand-in refuses an async copy from anything else)."""
    path = write_engine_file(tmp_path / "s.engine", engine_plan((1, 3, 64, 64)), {})
    cuda = StandinCuda(standin)
    engine = TensorRTBackend(path, cuda=cuda)
    assert all(any(buffer is pinned for pinned in cuda.pinned) for buffer in engine.host.values())
    images = np.ones((1, 3, 64, 64), np.float32)
    np.testing.assert_allclose(engine(images), expected_output(images))
    with pytest.raises(YoloslimError, match="up to 1 images .* --dynamic --max-batch"):
        engine(np.ones((2, 3, 64, 64), np.float32))


@pytest.mark.parametrize("standin", ["10.3.0.30"], indirect=True)
def test_an_output_shaped_by_the_data_is_refused_and_nothing_is_kept(standin, tmp_path, monkeypatch):
    """An engine whose output size depends on the data (an NMS or NonZero in the graph) cannot get a buffer sized
    ahead: one line naming the output, and the input buffers and stream already made are given back."""
    import trt_standin

    resolved = trt_standin.Context.get_tensor_shape
    monkeypatch.setattr(
        trt_standin.Context, "get_tensor_shape", lambda self, n: (-1, 6) if n == "output0" else resolved(self, n)
    )
    cuda = StandinCuda(standin)
    with pytest.raises(YoloslimError, match="output output0 .* depends on the data"):
        TensorRTBackend(write_engine_file(tmp_path / "s.engine", engine_plan((1, 3, 64, 64)), {}), cuda=cuda)
    assert standin.memory == {} and cuda.pinned == [] and "stream" in standin.released


@pytest.mark.parametrize("standin", ["10.3.0.30"], indirect=True)
def test_bench_frees_each_engines_buffers(standin, tmp_path, monkeypatch):
    """Backends are context managers; yoloslim bench (like eval and detect) leaves no device memory behind."""
    from yoloslim.bench import bench

    cuda = StandinCuda(standin)
    monkeypatch.setattr(cuda_module, "load_cuda", lambda: cuda)
    path = write_engine_file(tmp_path / "s.engine", engine_plan((1, 3, 64, 64)), {"imgsz": [64, 64]})
    bench([path], imgsz=64, threads=1, rounds=2, per_round=1)
    assert standin.memory == {} and cuda.pinned == []


@pytest.mark.parametrize("standin", ["10.3.0.30"], indirect=True)
def test_close_releases_the_context_then_the_engine_then_the_runtime_then_the_buffers(standin, tmp_path):
    path = write_engine_file(tmp_path / "s.engine", engine_plan((1, 3, 64, 64)), {})
    engine = TensorRTBackend(path, cuda=StandinCuda(standin))
    engine(np.ones((1, 3, 64, 64), np.float32))
    engine.close()
    engine.close()
    assert standin.released == ["context", "engine", "runtime"] + ["device buffer"] * 2 + ["host buffer"] * 2 + [
        "stream"
    ]
    with pytest.raises(YoloslimError, match="was closed; load the engine again"):
        engine(np.ones((1, 3, 64, 64), np.float32))


def test_engine_header_round_trip_and_ultralytics_reads_it(tmp_path):
    from ultralytics.nn.backends.base import BaseBackend

    meta = {"names": {0: "plate"}, "stride": 32, "imgsz": [320, 320], "yoloslim": {"precision": "int8"}}
    plan = bytes(range(256)) * 10
    path = write_engine_file(tmp_path / "m.engine", plan, meta)
    offset, read = read_engine_header(path)
    assert read["yoloslim"]["precision"] == "int8" and read_engine_file(path)[1] == plan
    assert BaseBackend.engine_header(path) == (offset, read)  # what YOLO("m.engine") reads
    raw = write_engine_file(tmp_path / "raw.plan", plan, None)
    assert raw.read_bytes() == plan and read_engine_header(raw) == (0, {})


@pytest.mark.parametrize("standin", ["10.3.0.30"], indirect=True)
def test_ultralytics_loads_a_yoloslim_engine_up_to_where_it_needs_cuda(standin, tmp_path, monkeypatch):
    """Ultralytics 8.4's TensorRT backend copies every metadata key onto itself (BaseBackend.apply_metadata); run its
    real load_model on a yoloslim engine until its first CUDA tensor, which this machine cannot make."""
    import torch
    from ultralytics.nn.autobackend import check_class_names
    from ultralytics.nn.backends.tensorrt import TensorRTBackend as UltralyticsTensorRT

    if torch.cuda.is_available():
        pytest.skip("this test stops where Ultralytics needs CUDA, and this machine has it")
    engine = build_engine(SELFTEST["fp32"], out=tmp_path / "m.engine", precision="fp16", device=ORIN)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # the CUDA context it enters
    backend = UltralyticsTensorRT.__new__(UltralyticsTensorRT)
    with pytest.raises((RuntimeError, AssertionError), match="NVIDIA|CUDA"):
        backend.__init__(engine, device=torch.device("cpu"))  # stops at .to(self.device): no GPU here
    assert backend.device == torch.device("cuda:0")
    assert check_class_names(backend.names) == {0: "a", 1: "b"}  # as AutoBackend reads them next
    assert backend.stride == 32 and backend.imgsz == [64, 64]
    assert backend.task == "detect" and backend.yoloslim["precision"] == "fp16"


def test_engines_run_only_where_nvidia_says_they_can():
    built = {"tensorrt": "10.3.0.30", "device": ORIN}
    check_engine_compatible({"yoloslim": built}, "10.3.0.30", ORIN)
    refused = [
        ({"tensorrt": "10.3.0.30"}, "10.3.0.26"),  # the build number counts for an ordinary engine
        ({"tensorrt": "10.3.0.30"}, "10.7.0.23"),
        ({"tensorrt": "8.6.2.3"}, "10.3.0.30"),
        ({"tensorrt": "10.7.0.23", "version_compatible": True}, "10.3.0.30"),  # newer than the runtime
        ({"tensorrt": "8.6.2.3", "version_compatible": True}, "11.4.1"),  # NVIDIA: TensorRT 8 engines not on 11
    ]
    for own, runtime in refused:
        with pytest.raises(YoloslimError, match="cannot run here"):
            check_engine_compatible({"yoloslim": own}, runtime, ORIN)
    accepted = [
        ({"tensorrt": "10.3.0.30", "version_compatible": True}, "10.7.0.23"),
        ({"tensorrt": "8.6.2.3", "version_compatible": True}, "10.3.0.30"),
        ({"tensorrt": "10.3.0.30", "version_compatible": True}, "11.4.1"),
    ]
    for own, runtime in accepted:
        check_engine_compatible({"yoloslim": own}, runtime, ORIN)
    with pytest.raises(YoloslimError, match="compute capability 7.2"):
        check_engine_compatible({"yoloslim": {**built, "device": {"compute_capability": "7.2"}}}, "10.3.0.30", ORIN)


@pytest.mark.parametrize("standin", ["10.3.0.30"], indirect=True)
def test_a_version_compatible_engine_of_8_6_runs_on_10(standin, tmp_path, monkeypatch):
    jetpack6 = make_tensorrt("8.6.2.3")
    monkeypatch.setitem(sys.modules, "tensorrt", jetpack6)
    engine = build_engine(SELFTEST["fp32"], out=tmp_path / "vc.engine", precision="fp16", version_compatible=True)
    monkeypatch.setitem(sys.modules, "tensorrt", standin)
    backend = TensorRTBackend(engine, cuda=StandinCuda(standin))  # the stand-in refuses it without host code allowed
    assert backend.runtime.engine_host_code_allowed is True
    images = np.ones((1, 3, 64, 64), np.float32)
    np.testing.assert_allclose(backend(images), expected_output(images, channels=6))


def _fake_cuda_python(monkeypatch, error: int) -> None:
    """cuda-python that imports and answers cudaGetDeviceCount with `error` (35: a driver older than its CUDA)."""
    codes = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorInsufficientDriver": 35})
    runtime = types.SimpleNamespace(cudaGetDeviceCount=lambda: (codes(error), 1))
    bindings = types.SimpleNamespace(runtime=runtime)
    monkeypatch.setitem(sys.modules, "cuda", types.SimpleNamespace(bindings=bindings))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)


def _fake_pycuda(monkeypatch) -> None:
    driver = types.SimpleNamespace(Context=types.SimpleNamespace(get_device=None))
    monkeypatch.setitem(sys.modules, "pycuda", types.SimpleNamespace(driver=driver))
    monkeypatch.setitem(sys.modules, "pycuda.autoinit", types.ModuleType("pycuda.autoinit"))
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)


def test_a_cuda_python_too_new_for_the_driver_falls_back_to_pycuda(monkeypatch):
    _fake_cuda_python(monkeypatch, error=35)
    _fake_pycuda(monkeypatch)
    assert isinstance(cuda_module.load_cuda(), cuda_module.PyCuda)
    monkeypatch.setitem(sys.modules, "pycuda", None)  # and without pycuda, one error saying why each failed
    with pytest.raises(
        YoloslimError, match="cuda-(python|bindings) .*fails: CUDA error .*InsufficientDriver.*pycuda is not"
    ):
        cuda_module.load_cuda()
    _fake_cuda_python(monkeypatch, error=0)
    assert isinstance(cuda_module.load_cuda(), cuda_module.CudaPython)


def test_doctor_names_the_cuda_python_for_this_cuda(monkeypatch):
    from yoloslim.runtime import doctor

    assert cuda_module.cuda_python_requirement("11.4").endswith("pip install pycuda")  # no cuda-python release
    assert cuda_module.cuda_python_requirement("11.8") == "cuda-python>=11.0,<11.9"
    assert cuda_module.cuda_python_requirement("13.0") == "cuda-python>=13.0,<13.1"
    monkeypatch.setattr(doctor, "nvcc_release", lambda: "Cuda compilation tools, release 12.6, V12.6.68")
    found = doctor.facts()
    assert found["cuda-python for this CUDA"] == "cuda-python>=12.0,<12.7"
    if found["CUDA binding"] is None:  # this machine: no binding answers, and its row says why, once
        row = next(line for line in doctor.report().splitlines() if line.startswith("| CUDA binding |"))
        assert "none usable: " in row and "doctor" not in row, row


def test_onnx_metadata_reader_matches_the_onnx_package():
    ours = read_onnx_metadata(SELFTEST["int8"])
    theirs = {p.key: p.value for p in onnx.load(str(SELFTEST["int8"])).metadata_props}
    assert set(ours) == set(theirs) and ours["names"] == {0: "a", 1: "b"} and ours["precision"] == "int8"


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_selftest_references_are_the_shipped_onnx_outputs(precision):
    """The device checks engines against stored ONNX Runtime outputs; they must still be those files' outputs."""
    from yoloslim.runtime.backends import OnnxRuntimeBackend

    stored = np.load(ASSETS / "selftest.npz")
    got = OnnxRuntimeBackend(str(SELFTEST[precision]), threads=1)(stored["images"])
    np.testing.assert_allclose(got, stored[precision], rtol=1e-4, atol=1e-4)
    assert sorted(SELFTEST.values()) == sorted(ASSETS / name for name in SELFTEST_ONNX)


@pytest.mark.parametrize("standin", ["10.3.0.30", "11.4.1"], indirect=True)
def test_selftest_with_the_standin_builds_each_engine_and_catches_a_wrong_output(standin, monkeypatch):
    """The stand-in computes a known function, not the model, so every comparison must fail: the check can fail."""
    from yoloslim.runtime import doctor

    monkeypatch.setattr(cuda_module, "load_cuda", lambda: StandinCuda(standin))
    ok, text = doctor.selftest()
    built = [line.split(":")[0] for line in text.splitlines()[1:] if "->" in line]
    expected = [
        "selftest.onnx -> fp32",
        "selftest.onnx -> fp16",
        "selftest-fp16.onnx -> fp16",
        "selftest-int8.onnx -> int8",
    ]
    assert built == (expected if standin.__version__.startswith("10.") else [e for e in expected if e != expected[1]])
    assert not ok and text.count("FAIL (") == len(built)


@pytest.mark.parametrize("standin", ["10.3.0.30"], indirect=True)
def test_benchmark_with_the_standin_writes_one_report(standin, two_class_data, tmp_path, monkeypatch):
    """Everything around TensorRT runs for real: data, output checks against ONNX Runtime, interleaved timing, mAP
    where the model's classes are the dataset's, environment, JSON and Markdown."""
    import yaml

    from yoloslim.device_bench import device_benchmark, write_device_benchmark

    names = yaml.safe_load(two_class_data.read_text())["names"]
    renamed = onnx.load(str(SELFTEST["fp32"]))  # the self-test model, told it detects the dataset's two classes
    next(p for p in renamed.metadata_props if p.key == "names").value = str(dict(names))
    onnx.save(renamed, str(tmp_path / "renamed.onnx"))
    monkeypatch.setattr(cuda_module, "load_cuda", lambda: StandinCuda(standin))
    onnx_files = [tmp_path / "renamed.onnx", SELFTEST["int8"]]
    result = device_benchmark(onnx_files, data=two_class_data, rounds=2, per_round=2, bootstrap=20)
    run = write_device_benchmark(result, project=str(tmp_path / "runs"), name="bench")
    assert [(Path(r["onnx"]).name, r["precision"]) for r in result["engines"]] == [
        ("renamed.onnx", "fp32"),
        ("renamed.onnx", "fp16"),
        ("selftest-int8.onnx", "int8"),
    ]
    renamed_fp32, _, int8 = result["engines"]
    assert (
        renamed_fp32["check"]["reference"] == "ONNX Runtime on a dataset image" and not renamed_fp32["check"]["passed"]
    )
    assert int8["check"]["reference"] == "stored ONNX Runtime output" and not int8["check"]["passed"]
    assert 0 <= renamed_fp32["eval"]["map"] <= 1 and renamed_fp32["eval"]["images"] == 4
    assert "not the dataset's" in int8["eval"]["skipped"]
    assert renamed_fp32["model"]["runs"] == 4 and renamed_fp32["end_to_end"]["fps"] > 0
    assert [Path(r["onnx"]).name for r in result["onnxruntime"]] == ["renamed.onnx", "selftest-int8.onnx"]
    assert "power mode" in result["environment"] and "GPU clocks" in result["environment"]
    assert sorted(p.name for p in run.iterdir()) == ["benchmark.json", "benchmark.md"]
    table = (run / "benchmark.md").read_text()
    assert "| renamed.onnx | fp16 | fp16 or fp32, TensorRT's choice per layer |" in table and "FAIL (max error" in table


@pytest.mark.parametrize("standin", ["10.3.0.30"], indirect=True)
def test_benchmark_reports_an_engine_the_runtime_refuses_and_goes_on(standin, tiny_data, tmp_path, monkeypatch):
    import trt_standin

    from yoloslim.device_bench import device_benchmark, device_benchmark_markdown

    resolved = trt_standin.Context.get_tensor_shape
    monkeypatch.setattr(
        trt_standin.Context, "get_tensor_shape", lambda self, n: (-1, 6) if n == "output0" else resolved(self, n)
    )
    cuda = StandinCuda(standin)
    monkeypatch.setattr(cuda_module, "load_cuda", lambda: cuda)
    result = device_benchmark([SELFTEST["int8"]], data=tiny_data, rounds=1, per_round=1, bootstrap=10)
    (row,) = result["engines"]
    assert "refused" in row["error"] and "depends on the data" in row["error"]
    assert "failed (built, but the runtime refused it" in device_benchmark_markdown(result)
    assert standin.memory == {} and cuda.pinned == []


# Python's own way to make a module unimportable and not found (importlib.util.find_spec returns None for it).
BLOCKER = "import sys\nsys.modules.update(dict.fromkeys({blocked}, None))\n".format(
    blocked=["torch", "torchvision", "ultralytics", "onnx", "onnxruntime", "onnxslim", "tensorrt"]
)


def test_device_suite_and_benchmark_need_only_the_base_install(tmp_path):
    """On the device `pytest -m jetson` and `yoloslim doctor --benchmark` run with numpy, OpenCV, PyYAML, tqdm, pytest
    and TensorRT only; here, with the rest made unimportable and no TensorRT, they skip or stop with one line."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    suite = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "jetson", "-rs", "tests/test_jetson_device.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert suite.returncode == 0 and " skipped" in suite.stdout and "error" not in suite.stdout.lower(), suite.stdout
    assert "SKIPPED" in suite.stdout and "needs TensorRT and a CUDA GPU" in suite.stdout
    command = [sys.executable, "-c", "from yoloslim.cli import main; raise SystemExit(main())", "doctor", "--benchmark"]
    bench = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bench.returncode == 2 and bench.stderr.strip().splitlines() == [
        "yoloslim doctor: error: TensorRT is not installed; on a Jetson it comes with JetPack (python3-libnvinfer)"
    ]
    assert "| TensorRT | not found |" in bench.stdout and not (tmp_path / "runs").exists()
