"""Real TensorRT engines on the device: `python -m pytest -m jetson tests/test_jetson_device.py` on a Jetson.

Needs only what a Jetson has after `pip install yoloslim pytest`: the base install (numpy, OpenCV, PyYAML, tqdm),
pytest, JetPack's TensorRT and a CUDA binding (cuda-python or pycuda). No torch, onnx, onnxruntime or ultralytics, no
file outside the repository: the engines are built from the shipped self-test ONNX files and compared with their
stored ONNX Runtime outputs; the benchmark runs on generated images. Where TensorRT is not installed every test here
skips with one line, as it does on the machines yoloslim is developed on.
"""

import dataclasses
import importlib.util
import json

import numpy as np
import pytest

from yoloslim.runtime.doctor import ASSETS, CHECKS, SELFTEST_ONNX, engine_precisions, onnx_precision, output_error

pytestmark = [
    pytest.mark.jetson,
    pytest.mark.skipif(
        importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT and a CUDA GPU: run it on a Jetson"
    ),
]


@pytest.fixture(scope="module")
def trt_major():
    import tensorrt

    from yoloslim.runtime.tensorrt import version_tuple

    return version_tuple(tensorrt.__version__)[0]


@pytest.fixture(scope="module")
def cuda():
    from yoloslim.runtime.cuda import load_cuda

    return load_cuda()


def test_the_cuda_binding_copies_through_page_locked_memory(cuda):
    assert cuda.device()["compute_capability"]
    stream = cuda.stream()
    host = cuda.host_empty((4, 5), np.float32)
    back = cuda.host_empty((4, 5), np.float32)
    host[...] = np.arange(20, dtype=np.float32).reshape(4, 5)
    device = cuda.malloc(host.nbytes)
    cuda.to_device(device, host, stream)
    cuda.to_host(back, device, stream)
    cuda.synchronize(stream)
    np.testing.assert_array_equal(back, host)
    cuda.free(device)
    cuda.free_host(host)
    cuda.free_host(back)
    cuda.destroy_stream(stream)


@pytest.mark.parametrize("onnx_name", SELFTEST_ONNX)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_output_matches_onnx_runtime(onnx_name, precision, trt_major, cuda, tmp_path):
    from yoloslim.runtime.tensorrt import TensorRTBackend, build_engine

    source = ASSETS / onnx_name
    if precision not in engine_precisions(onnx_precision(source), trt_major):
        pytest.skip(f"TensorRT {trt_major} builds no {precision} engine from {onnx_name}")
    engine = TensorRTBackend(
        build_engine(source, out=tmp_path / "m.engine", precision=precision, workspace_gb=0.5, device=cuda.device()),
        cuda=cuda,
    )
    stored = np.load(ASSETS / "selftest.npz")
    try:
        error = output_error(engine(stored["images"]), stored[onnx_precision(source)])
    finally:
        engine.close()
    statistic, bound = CHECKS[precision]
    assert error[statistic] <= bound, error


def test_an_engine_for_another_tensorrt_is_refused_before_tensorrt_reads_it(cuda, tmp_path):
    from yoloslim.runtime.engine_file import read_engine_file, write_engine_file
    from yoloslim.runtime.tensorrt import TensorRTBackend, build_engine
    from yoloslim.utils.errors import YoloslimError

    engine = build_engine(ASSETS / "selftest.onnx", out=tmp_path / "m.engine", precision="fp32", workspace_gb=0.5)
    meta, plan = read_engine_file(engine)
    meta["yoloslim"]["tensorrt"] = "7.1.3.0"
    write_engine_file(engine, plan, meta)
    with pytest.raises(YoloslimError, match="built with TensorRT 7.1.3.0"):
        TensorRTBackend(engine, cuda=cuda)


def test_doctor_selftest_passes():
    from yoloslim.runtime.doctor import selftest

    ok, text = selftest()
    assert ok, text


def test_benchmark_reports_every_engine_on_generated_images(tmp_path):
    from yoloslim.data.synthetic import default_config, ensure_synthetic_dataset
    from yoloslim.device_bench import device_benchmark, write_device_benchmark

    small = dataclasses.replace(default_config(), image_size=96, splits={"train": 2, "val": 4}, object_size=(8, 48))
    result = device_benchmark(data=ensure_synthetic_dataset(small, root=tmp_path / "data"), rounds=2, per_round=2)
    run = write_device_benchmark(result, project=str(tmp_path / "runs"))
    assert all(row["check"]["passed"] for row in result["engines"]), json.dumps(result["engines"], indent=1)
    assert all(row["model"]["p50_ms"] > 0 for row in result["engines"])
    assert (run / "benchmark.md").read_text().count("| selftest") == len(result["engines"])
