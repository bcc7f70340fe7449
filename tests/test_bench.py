import json

import numpy as np
import pytest

from yoloslim.bench import bench, bench_table
from yoloslim.utils.timing import Latency, compare_latency, speedup_interval


def test_variants_are_interleaved_in_rotating_order():
    calls = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timed = compare_latency(variants, rounds=3, per_round=2, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert "".join(calls[3:]) == "aabbcc" + "bbccaa" + "ccaabb"
    assert all(t.runs == 6 and t.p50_ms <= t.p99_ms for t in timed.values())
    assert all(len(t.rounds_ms) == 3 and "rounds_ms" not in t.as_dict() for t in timed.values())


def test_speedup_interval_resamples_rounds_paired():
    rng = np.random.default_rng(1)
    drift = rng.uniform(1.0, 3.0, size=(40, 1))  # the machine's speed wanders from round to round, hitting both alike
    base = Latency.from_rounds(drift * 0.020 * rng.uniform(0.98, 1.02, size=(40, 5)))
    pruned = Latency.from_rounds(drift * 0.010 * rng.uniform(0.98, 1.02, size=(40, 5)))
    low, high = speedup_interval(base, pruned)
    assert low < base.p50_ms / pruned.p50_ms < high and 1.9 < low and high < 2.1  # paired: the drift cancels
    shuffled = Latency.from_rounds(rng.permutation(np.asarray(pruned.rounds_ms) / 1e3))  # same calls, rounds unpaired
    unpaired_low, unpaired_high = speedup_interval(base, shuffled)
    assert unpaired_high - unpaired_low > 3 * (high - low)
    with pytest.raises(ValueError, match="same compare_latency run"):
        speedup_interval(base, Latency.from_rounds(np.full((3, 5), 0.01)))


def test_bench_json_schema(shipped_weights, shipped_onnx, synthetic_data):
    image = next((synthetic_data.parent / "images" / "val").glob("*.jpg"))
    report = json.loads(
        json.dumps(bench([shipped_weights, shipped_onnx], imgsz=320, threads=1, image=image, rounds=2, per_round=2))
    )
    assert set(report) == {"results", "image", "environment"}
    assert {
        "cpu",
        "cores",
        "threads",
        "python",
        "numpy",
        "onnxruntime",
        "torch",
        "TensorRT",
        "power mode",
        "clocks",
    } <= set(report["environment"])
    assert report["environment"]["threads"] == 1
    pt, ox = report["results"]
    for r in (pt, ox):
        assert {
            "weights",
            "backend",
            "imgsz",
            "batch",
            "params",
            "gflops",
            "size_mb",
            "model",
            "end_to_end",
            "fps_end_to_end",
        } <= set(r)
        for part in ("model", "end_to_end"):
            assert set(r[part]) == {"mean_ms", "p50_ms", "p90_ms", "p99_ms", "fps", "runs"} and r[part]["runs"] == 4
    assert (
        pt["backend"] == "TorchBackend"
        and pt["gflops"] > 0
        and ox["backend"] == "OnnxRuntimeBackend"
        and ox["gflops"] is None
    )
    assert "not measured" in bench_table(report)
    assert pt["speedup"] == 1.0 and ox["speedup"] == pytest.approx(pt["model"]["p50_ms"] / ox["model"]["p50_ms"])
    low, high = ox["speedup_ci95"]
    assert 0 < low <= high
    assert "| speedup vs first (95% CI) |" in bench_table(report) and "| 320 |" in bench_table(report)


def test_ops_profiles_onnx_models_by_operator_type(shipped_weights, shipped_onnx, synthetic_data):
    image = next((synthetic_data.parent / "images" / "val").glob("*.jpg"))
    report = bench([shipped_weights, shipped_onnx], imgsz=320, threads=1, image=image, rounds=1, per_round=1, ops=True)
    pt, ox = report["results"]
    assert pt["operators"] is None  # ONNX Runtime's profiler only
    times = ox["operators"]
    assert list(times)[0] == "Conv" and all(ms > 0 for ms in times.values())
    assert list(times.values()) == sorted(times.values(), reverse=True)
    assert sum(times.values()) < 3 * ox["model"]["p50_ms"]  # one call's share, not the sum over the profiled calls
    table = bench_table(report)
    assert "| Conv | " in table and "| total | " in table and "(100%) |" in table


def test_an_unreadable_source_image_is_named(shipped_weights, tmp_path):
    from yoloslim.utils.errors import YoloslimError

    with pytest.raises(YoloslimError, match="cannot read the image .*missing.jpg; give --source"):
        bench([shipped_weights], imgsz=64, threads=1, image=tmp_path / "missing.jpg")


@pytest.mark.parametrize(
    "flags,vector,dot",
    [
        ({"sse4_2", "avx", "avx2"}, "avx2", None),  # int8 kernels add pairs of products in int16
        ({"avx2", "avx512f", "avx512bw", "avx512_vnni"}, "avx512f", "avx512_vnni"),
        ({"avx2", "avx_vnni"}, "avx2", "avx_vnni"),
        ({"avx512f", "avx512_vnni", "amx_int8"}, "avx512f", "amx_int8"),
        ({"fp", "asimd", "asimddp"}, None, "asimddp"),  # an Arm CPU's "Features"
    ],
)
def test_the_environment_names_the_cpus_int8_dot_product(flags, vector, dot, monkeypatch):
    from yoloslim.runtime.doctor import environment
    from yoloslim.utils import machine

    monkeypatch.setattr(machine, "_cpu_flags", lambda: flags)
    assert machine.cpu_vector_isa() == vector
    assert machine.cpu_int8_dot_product() == dot
    assert environment(1)["cpu_int8_dot_product"] == dot
    # and the rounding doctor recommends for ONNX Runtime on it: its blocked convolutions' channel block
    from yoloslim.runtime.doctor import facts

    block = {"avx512f": 16, "avx2": 8}.get(vector)
    assert machine.onnxruntime_channel_block() == block
    shown = facts()["prune --round-to for ONNX Runtime here"]
    assert (shown is None) if block is None else shown.startswith(f"{block} ")


def test_onnx_params_count_the_layers_not_the_decodes_constants(shipped_weights, tmp_path):
    """The same model exported at two sizes has the same parameters (its grids and strides grow with the size)."""
    import onnx

    from yoloslim.bench import _onnx_params
    from yoloslim.export.onnx import export_onnx

    small = export_onnx(shipped_weights, imgsz=64, out=tmp_path / "64.onnx")
    large = export_onnx(shipped_weights, imgsz=320, out=tmp_path / "320.onnx")
    assert _onnx_params(onnx.load(str(small)).graph) == _onnx_params(onnx.load(str(large)).graph) > 0


def test_onnx_params_follow_a_float_weight_through_its_quantize_pair():
    from onnx import TensorProto, helper, numpy_helper

    from yoloslim.bench import _onnx_params

    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    nodes = [
        helper.make_node("QuantizeLinear", ["w", "s"], ["wq"]),
        helper.make_node("DequantizeLinear", ["wq", "s"], ["wd"]),
        helper.make_node("Conv", ["x", "wd"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    assert _onnx_params(helper.make_graph(nodes, "g", [x], [y], [weight, scale])) == 4 * 3 * 3 * 3
