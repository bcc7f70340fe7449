import json

import pytest

from conftest import SHARED
from yoloslim.bench import bench, bench_table, compare_latency

USER_WEIGHTS = SHARED / "weights" / "license_plate_yolov5nu.pt"
IMAGE = next((SHARED / "data" / "license_plate" / "images" / "val").glob("*.jpg"), None)


def test_variants_are_interleaved_in_rotating_order():
    calls = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timed = compare_latency(variants, rounds=3, per_round=2, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert "".join(calls[3:]) == "aabbcc" + "bbccaa" + "ccaabb"
    assert all(t.runs == 6 and t.p50_ms <= t.p99_ms for t in timed.values())


@pytest.mark.skipif(IMAGE is None, reason="../shared is not beside the project")
def test_bench_json_schema(tmp_path):
    from yoloslim.export.onnx import export_onnx

    onnx = export_onnx(USER_WEIGHTS, imgsz=64, out=tmp_path / "m.onnx")
    report = json.loads(json.dumps(bench([USER_WEIGHTS, onnx], imgsz=64, threads=1, image=IMAGE, rounds=2, per_round=2)))
    assert set(report) == {"results", "image", "environment"}
    assert {"cpu", "cores", "threads", "python", "numpy", "onnxruntime", "torch", "TensorRT", "power mode", "clocks"} <= set(report["environment"])
    assert report["environment"]["threads"] == 1
    pt, ox = report["results"]
    for r in (pt, ox):
        assert {"weights", "backend", "imgsz", "batch", "params", "gflops", "size_mb", "model", "end_to_end", "fps_end_to_end"} <= set(r)
        for part in ("model", "end_to_end"):
            assert set(r[part]) == {"mean_ms", "p50_ms", "p90_ms", "p99_ms", "fps", "runs"} and r[part]["runs"] == 4
    assert pt["backend"] == "TorchBackend" and pt["gflops"] > 0 and ox["backend"] == "OnnxRuntimeBackend" and ox["gflops"] is None
    assert "not measured" in bench_table(report)


def test_an_unreadable_source_image_is_named(tmp_path):
    from yoloslim.utils.errors import YoloslimError

    with pytest.raises(YoloslimError, match="cannot read the image .*missing.jpg; give --source"):
        bench([USER_WEIGHTS], imgsz=64, threads=1, image=tmp_path / "missing.jpg")
