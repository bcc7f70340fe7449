"""The TensorRT side: builder version logic against a stand-in (hardware boundary), the engine file format for real,
and real engine tests marked `jetson` (they run on a device with TensorRT and a GPU, and skip here)."""

import importlib.util
import sys

import numpy as np
import onnx
import pytest
from conftest import SHARED
from trt_standin import StandinCuda, engine_plan, expected_output, make_tensorrt

from yoloslim.runtime.engine_file import read_engine_file, read_engine_header, write_engine_file
from yoloslim.runtime.onnx_meta import read_onnx_metadata
from yoloslim.runtime.tensorrt import build_engine, check_engine_compatible
from yoloslim.utils.errors import YoloslimError

USER_WEIGHTS = SHARED / "weights" / "license_plate_yolov5nu.pt"
LICENSE_PLATE = SHARED / "data" / "license_plate" / "data.yaml"
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """A real static FP32 ONNX, a dynamic-batch one and a Q/DQ INT8 one, from a small model."""
    from yoloslim.export.onnx import export_onnx
    from yoloslim.export.qdq import quantize_int8

    if not USER_WEIGHTS.exists():
        pytest.skip("../shared is not beside the project")
    root = tmp_path_factory.mktemp("onnx")
    static = export_onnx(USER_WEIGHTS, imgsz=64, out=root / "static.onnx")
    dynamic = export_onnx(USER_WEIGHTS, imgsz=64, dynamic=True, out=root / "dynamic.onnx")
    int8 = quantize_int8(static, LICENSE_PLATE, count=8)
    return {"static": static, "dynamic": dynamic, "int8": int8}


@pytest.fixture
def standin(monkeypatch, request):
    trt = make_tensorrt(request.param)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


EXPECTED_FLAGS = {  # (version, precision) -> builder flags
    ("8.5.2.2", "fp32"): [],
    ("8.5.2.2", "fp16"): ["FP16"],
    ("8.5.2.2", "int8"): ["FP16", "INT8"],
    ("8.6.2", "fp16"): ["FP16"],
    ("8.6.2", "int8"): ["FP16", "INT8"],
    ("10.3.0", "fp32"): [],
    ("10.3.0", "fp16"): ["FP16"],
    ("10.3.0", "int8"): ["FP16", "INT8"],
    ("11.0.0", "fp32"): [],
    ("11.0.0", "int8"): [],
}


@pytest.mark.parametrize("standin,precision", [(v, p) for v, p in EXPECTED_FLAGS], indirect=["standin"])
def test_builder_uses_each_versions_api(standin, precision, onnx_files, tmp_path):
    source = onnx_files["int8" if precision == "int8" else "static"]
    out = build_engine(source, out=tmp_path / "m.engine", precision=precision, timing_cache=tmp_path / "cache")
    record = standin.calls[-1]
    assert record["builder_flags"] == EXPECTED_FLAGS[(standin.__version__, precision)]
    explicit = 1 << 0
    assert record["network_flags"] == (explicit if standin.__version__.startswith("8.") else 0)
    assert record["pools"]["WORKSPACE"] == 2 << 30
    assert (tmp_path / "cache").read_bytes() == b"+timed"  # the timing cache is written back
    meta, plan = read_engine_file(out)
    assert (
        plan.startswith(b"STANDIN-PLAN") and meta["precision"] == precision and meta["tensorrt"] == standin.__version__
    )
    assert meta["names"] == {0: "License_Plate"} or meta["names"] == {"0": "License_Plate"}


@pytest.mark.parametrize("standin", ["8.6.2", "10.3.0", "11.0.0"], indirect=True)
def test_int8_needs_a_qdq_onnx(standin, onnx_files, tmp_path):
    with pytest.raises(YoloslimError, match="Q/DQ ONNX"):
        build_engine(onnx_files["static"], out=tmp_path / "m.engine", precision="int8")


@pytest.mark.parametrize("standin", ["8.6.2", "10.3.0", "11.0.0"], indirect=True)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_qdq_onnx_builds_only_int8(standin, precision, onnx_files, tmp_path):
    with pytest.raises(YoloslimError, match="--precision int8"):
        build_engine(onnx_files["int8"], out=tmp_path / "m.engine", precision=precision)


@pytest.mark.parametrize("standin", ["10.3.0"], indirect=True)
def test_a_timing_cache_from_another_device_is_replaced_not_fatal(standin, onnx_files, tmp_path):
    (tmp_path / "cache").write_bytes(b"OTHER-GPU")
    build_engine(onnx_files["static"], out=tmp_path / "m.engine", precision="fp16", timing_cache=tmp_path / "cache")
    assert (tmp_path / "cache").read_bytes() == b"+timed"


@pytest.mark.parametrize("standin", ["10.3.0"], indirect=True)
def test_the_engine_never_overwrites_its_onnx(standin, onnx_files, tmp_path):
    source = tmp_path / "m.onnx"
    source.write_bytes(onnx_files["static"].read_bytes())
    with pytest.raises(YoloslimError, match="is the input file"):
        build_engine(source, out=source, precision="fp16")
    assert source.read_bytes() == onnx_files["static"].read_bytes()


@pytest.mark.parametrize("standin", ["11.0.0"], indirect=True)
def test_tensorrt_11_builds_fp16_only_from_an_fp16_onnx(standin, onnx_files, tmp_path):
    with pytest.raises(YoloslimError, match="FP16 ONNX"):
        build_engine(onnx_files["static"], out=tmp_path / "m.engine", precision="fp16")


@pytest.mark.parametrize("standin", ["8.5.2.2", "10.3.0"], indirect=True)
def test_dynamic_batch_gets_an_optimization_profile(standin, onnx_files, tmp_path):
    out = build_engine(onnx_files["dynamic"], out=tmp_path / "d.engine", precision="fp16", batch=(1, 4, 8))
    (profile,) = standin.calls[-1]["profiles"]
    assert profile["images"] == ((1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64))
    meta, _ = read_engine_file(out)
    assert meta["dynamic"] is True and meta["batch"] == 8


@pytest.mark.parametrize("standin", ["10.3.0"], indirect=True)
def test_export_passes_its_engine_settings_to_the_builder(standin, onnx_files, tmp_path, monkeypatch):
    from yoloslim.export import ExportConfig, export
    from yoloslim.runtime import cuda

    monkeypatch.setattr(cuda, "load_cuda", lambda: StandinCuda(standin.memory))
    config = ExportConfig(
        format="engine", precision="fp16", dynamic=True, batch=2, max_batch=4, version_compatible=True
    )
    out = export(onnx_files["dynamic"], config, out=tmp_path / "m.engine")
    record = standin.calls[-1]
    assert record["builder_flags"] == ["FP16", "VERSION_COMPATIBLE"]
    assert [shape[0] for shape in record["profiles"][0]["images"]] == [1, 2, 4]
    meta, _ = read_engine_file(out)
    assert meta["version_compatible"] is True and meta["device"]["name"] == "stand-in"


@pytest.mark.parametrize("standin", ["8.5.2.2"], indirect=True)
def test_version_compatible_needs_8_6(standin, onnx_files, tmp_path):
    with pytest.raises(YoloslimError, match="8.6"):
        build_engine(onnx_files["static"], out=tmp_path / "m.engine", version_compatible=True)


@pytest.mark.parametrize("standin", ["8.5.2.2", "10.3.0"], indirect=True)
def test_runtime_sizes_buffers_from_the_profile_and_the_context(standin, tmp_path):
    """Ultralytics' dynamic export leaves batch, height and width open, so the engine reports the output as
    (-1, 5, -1): only the context, told the profile's largest input, knows the output's size."""
    from yoloslim.runtime.tensorrt import TensorRTBackend

    plan = engine_plan((-1, 3, -1, -1), profile=[(1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64)])
    path = write_engine_file(tmp_path / "d.engine", plan, {"tensorrt": standin.__version__, "imgsz": [64, 64]})
    engine = TensorRTBackend(path, cuda=StandinCuda(standin.memory))
    assert engine.host["output0"].shape == (8, 5, 84) and engine.imgsz == 64
    for n in (3, 8, 1):
        images = np.random.default_rng(n).random((n, 3, 64, 64), dtype=np.float32)
        np.testing.assert_allclose(engine(images), expected_output(images), rtol=1e-6)
    with pytest.raises(YoloslimError, match="up to 8 images shaped"):
        engine(np.zeros((9, 3, 64, 64), np.float32))
    with pytest.raises(YoloslimError, match="up to 8 images shaped"):
        engine(np.zeros((1, 3, 32, 32), np.float32))
    engine.close()
    assert standin.memory == {}


@pytest.mark.parametrize("standin", ["10.3.0"], indirect=True)
def test_runtime_refuses_a_batch_larger_than_a_static_engine(standin, tmp_path):
    from yoloslim.runtime.tensorrt import TensorRTBackend

    path = write_engine_file(tmp_path / "s.engine", engine_plan((1, 3, 64, 64)), {"tensorrt": standin.__version__})
    engine = TensorRTBackend(path, cuda=StandinCuda(standin.memory))
    images = np.ones((1, 3, 64, 64), np.float32)
    np.testing.assert_allclose(engine(images), expected_output(images))
    with pytest.raises(YoloslimError, match="up to 1 images .* --dynamic --max-batch"):
        engine(np.ones((2, 3, 64, 64), np.float32))


def test_engine_header_round_trip_and_ultralytics_reads_it(tmp_path):
    from ultralytics.nn.backends.base import BaseBackend

    meta = {"names": {0: "plate"}, "stride": 32, "imgsz": [320, 320], "precision": "int8", "tensorrt": "10.3.0"}
    plan = bytes(range(256)) * 10
    path = write_engine_file(tmp_path / "m.engine", plan, meta)
    offset, read = read_engine_header(path)
    assert read["precision"] == "int8" and read_engine_file(path)[1] == plan
    assert BaseBackend.engine_header(path) == (offset, read)  # what YOLO("m.engine") reads
    raw = write_engine_file(tmp_path / "raw.plan", plan, None)
    assert raw.read_bytes() == plan and read_engine_header(raw) == (0, {})


def test_incompatible_engines_are_refused_before_loading():
    gpu = {"name": "Orin", "compute_capability": "8.7"}
    check_engine_compatible({"tensorrt": "10.3.0", "device": gpu}, "10.3.0", gpu)
    with pytest.raises(YoloslimError, match="built with TensorRT 8.6.2 but this device has 10.3.0"):
        check_engine_compatible({"tensorrt": "8.6.2"}, "10.3.0", gpu)
    check_engine_compatible({"tensorrt": "10.3.0", "version_compatible": True}, "10.7.0", gpu)
    with pytest.raises(YoloslimError, match="compute capability 7.2"):
        check_engine_compatible(
            {"tensorrt": "10.3.0", "device": {"compute_capability": "7.2", "name": "Xavier"}}, "10.3.0", gpu
        )


def test_onnx_metadata_reader_matches_the_onnx_package(onnx_files):
    ours = read_onnx_metadata(onnx_files["int8"])
    theirs = {p.key: p.value for p in onnx.load(str(onnx_files["int8"])).metadata_props}
    assert set(ours) == set(theirs) and ours["names"] == {0: "License_Plate"} and ours["stride"] == 32


@pytest.mark.jetson
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT and a CUDA GPU (run on a Jetson)")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_real_engine_matches_onnx_runtime(onnx_files, tmp_path, precision):
    from yoloslim.runtime.backends import OnnxRuntimeBackend
    from yoloslim.runtime.tensorrt import TensorRTBackend

    source = onnx_files["int8" if precision == "int8" else "static"]
    engine = TensorRTBackend(build_engine(source, out=tmp_path / f"{precision}.engine", precision=precision))
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    want = OnnxRuntimeBackend(str(source))(x)
    np.testing.assert_allclose(engine(x), want, atol=0.05 * np.abs(want).max())


def test_selftest_reference_matches_the_shipped_onnx():
    """The device self-test compares against a stored ONNX Runtime output; it must still be that model's output."""
    from yoloslim.runtime.backends import OnnxRuntimeBackend
    from yoloslim.runtime.doctor import ASSETS

    reference = np.load(ASSETS / "selftest.npz")
    got = OnnxRuntimeBackend(str(ASSETS / "selftest.onnx"), threads=1)(reference["images"])
    np.testing.assert_allclose(got, reference["output0"], rtol=1e-4, atol=1e-4)
    assert read_onnx_metadata(ASSETS / "selftest.onnx")["names"] == {0: "a", 1: "b"}


@pytest.mark.jetson
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT and a CUDA GPU (run on a Jetson)")
def test_doctor_selftest_passes_on_the_device():
    from yoloslim.runtime.doctor import selftest

    ok, text = selftest()
    assert ok, text
