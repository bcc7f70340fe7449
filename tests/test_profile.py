"""yoloslim profile: channel groups read from the ONNX graph, narrowed copies, the predictor, resuming a table."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from yoloslim.profile import LatencyTable, ProfileConfig, profile
from yoloslim.profile.groups import read_groups, slice_model
from yoloslim.profile.plans import best_multiple, random_plans
from yoloslim.profile.predictor import Features, Predictor
from yoloslim.utils.errors import YoloslimError


def _conv(name, x, cout, cin, k=1, group=1):
    rng = np.random.default_rng(len(name))
    weight = numpy_helper.from_array(rng.normal(size=(cout, cin // group, k, k)).astype(np.float32), f"{name}.weight")
    bias = numpy_helper.from_array(rng.normal(size=cout).astype(np.float32), f"{name}.bias")
    node = helper.make_node(
        "Conv", [x, weight.name, bias.name], [f"{name}_out"], pads=[k // 2] * 4, group=group, name=name
    )
    return [node], [weight, bias], f"{name}_out"


def tiny_onnx(path: Path) -> Path:
    """images -> conv a (8) -> SiLU -> Split [4, 4]; the second half -> conv b (4) -> Add with itself -> Concat with
    the first half -> conv c (8) -> MaxPool -> depthwise conv d -> conv head (5) -> Reshape: a C2f-like block, a
    depthwise conv and a head whose output is reshaped."""
    nodes, inits = [], []

    def add(parts):
        nodes.extend(parts[0])
        inits.extend(parts[1])
        return parts[2]

    a = add(_conv("a", "images", 8, 3, k=3))
    nodes += [helper.make_node("Sigmoid", [a], ["a_sig"]), helper.make_node("Mul", [a, "a_sig"], ["a_act"])]
    inits.append(numpy_helper.from_array(np.array([4, 4], dtype=np.int64), "split_sizes"))
    nodes.append(helper.make_node("Split", ["a_act", "split_sizes"], ["h1", "h2"], axis=1))
    b = add(_conv("b", "h2", 4, 4))
    nodes += [helper.make_node("Add", ["h2", b], ["res"]), helper.make_node("Concat", ["h1", "res"], ["cat"], axis=1)]
    c = add(_conv("c", "cat", 8, 8))
    nodes.append(helper.make_node("MaxPool", [c], ["pool"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    d = add(_conv("d", "pool", 8, 8, k=3, group=8))
    head = add(_conv("head", d, 5, 8))
    inits.append(numpy_helper.from_array(np.array([1, 5, -1], dtype=np.int64), "shape"))
    nodes.append(helper.make_node("Reshape", [head, "shape"], ["output0"]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 5, 1024])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def run(model) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": np.zeros((1, 3, 32, 32), np.float32)})[0]


def weight_shapes(model) -> dict:
    return {t.name: tuple(t.dims) for t in model.graph.initializer if t.name.endswith(".weight")}


def test_groups_of_a_handmade_graph(tmp_path):
    graph = read_groups(onnx.load(str(tiny_onnx(tmp_path / "tiny.onnx"))))
    found = {g.root: (g.convs, g.size, g.sections, g.fixed) for g in graph.groups}
    assert found == {
        "a.weight": (["a.weight", "b.weight"], 4, 2, False),  # the residual joins b to a's second half
        "c.weight": (["c.weight", "d.weight"], 8, 1, False),  # depthwise d filters c's channels
        "head.weight": (["head.weight"], 5, 1, True),  # its output is reshaped
    }


def test_a_sliced_copy_runs_and_has_the_intended_widths(tmp_path):
    model = onnx.load(str(tiny_onnx(tmp_path / "tiny.onnx")))
    sliced = slice_model(read_groups(model), {"a.weight": 2, "c.weight": 3})
    onnx.checker.check_model(sliced)
    assert weight_shapes(sliced) == {
        "a.weight": (4, 3, 3, 3),  # two of each half
        "b.weight": (2, 2, 1, 1),
        "c.weight": (3, 4, 1, 1),
        "d.weight": (3, 1, 3, 3),
        "head.weight": (5, 3, 1, 1),
    }
    assert run(sliced).shape == run(model).shape == (1, 5, 1024)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", ["yolov5n.yaml", "yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"])
def test_onnx_groups_are_the_torch_pruning_groups(cfg, tmp_path):
    """The groups read from the export are torch-pruning's (graph.py), by the names of their deployed convolutions,
    with their widths and equal parts; a copy narrowed to half runs with those widths and the same output shape."""
    from test_prune import random_model, save_as_ultralytics_would

    from yoloslim.export.onnx import export_onnx
    from yoloslim.graph import build_graph, group_out_convs, undeployed_modules

    model = random_model(cfg=cfg)
    onnx_path = export_onnx(save_as_ultralytics_would(model, tmp_path / "m.pt"), imgsz=64, out=tmp_path / "m.onnx")
    exported = onnx.load(str(onnx_path))
    graph = read_groups(exported)
    names = {m: n for n, m in model.named_modules()}
    torch_graph, torch_groups = build_graph(model.float())
    undeployed = undeployed_modules(model)  # YOLO26's one-to-many branch, which the export drops
    deployed = [
        (sorted(f"{names[c]}.weight" for c, _, _ in group_out_convs(torch_graph, g) if c not in undeployed), g)
        for g in torch_groups
    ]
    want = sorted((convs, g.size, len(g.parts) or 1) for convs, g in deployed if convs)
    got = sorted((sorted(g.convs), g.size * g.sections, g.sections) for g in graph.prunable)
    assert got == want
    widths = {g.root: max(1, g.size // 2) for g in graph.prunable}
    sliced = slice_model(graph, widths)
    before, after = weight_shapes(exported), weight_shapes(sliced)
    for g in graph.prunable:  # each producer keeps the same share of its outputs (one section or all of them)
        assert all(after[c][0] * g.size == before[c][0] * widths[g.root] for c in g.convs)
    x = np.zeros((1, 3, 64, 64), np.float32)
    out = ort.InferenceSession(sliced.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": x})
    assert out[0].shape == run_shape(exported, x)


def run_shape(model, x) -> tuple:
    return (
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        .run(None, {"images": x})[0]
        .shape
    )


def synthetic_timer(features: Features, coefficients: np.ndarray, calls: list, fail_after: int | None = None):
    """A measure() whose latency is a known function of the plan's work; it can fail part way, as a killed run."""

    def measure(widths, rounds):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt
        calls.append(dict(widths))
        ratio = float(features(widths) @ coefficients)
        return 10 * ratio, 10.0, ratio

    return measure


@pytest.fixture
def tiny(tmp_path):
    """The handmade model and its features."""
    path = tiny_onnx(tmp_path / "tiny.onnx")
    return path, Features.of_graph(read_groups(onnx.load(str(path))))


def test_predictor_fits_synthetic_timings(tiny, tmp_path):
    path, features = tiny
    truth = np.zeros(len(features.names) + 1)
    truth[0], truth[1:] = 0.2, np.linspace(0.05, 0.3, len(features.names))
    truth[1:] *= 0.8 / (features(features.sizes)[1:] @ truth[1:])  # the unpruned model at 1.0
    table = profile(
        path, ProfileConfig(threads=1), out=tmp_path / "t.json", measure=synthetic_timer(features, truth, [])
    )
    assert table.data["check"]["max_error"] < 1e-3
    plan = random_plans(features.sizes, 1, 1, seed=7)[0]
    assert table.predictor(plan) == pytest.approx(float(features(plan) @ truth), rel=1e-2)
    assert LatencyTable.load(tmp_path / "t.json").round_to == table.round_to


def test_a_table_that_lacks_what_pruning_reads_is_refused(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"format": 1, "complete": True}))
    with pytest.raises(YoloslimError, match="finished latency table"):
        LatencyTable.load(tmp_path / "t.json")


def test_an_interrupted_profile_continues_where_it_stopped(tiny, tmp_path):
    path, features = tiny
    truth = np.concatenate([[0.3], np.full(len(features.names), 0.05)])
    out, first, second = tmp_path / "t.json", [], []
    with pytest.raises(KeyboardInterrupt):
        profile(path, ProfileConfig(threads=1), out=out, measure=synthetic_timer(features, truth, first, fail_after=7))
    saved = json.loads(out.read_text())
    assert not saved["complete"] and len(saved["measurements"]) == 7
    with pytest.raises(YoloslimError, match="finished latency table"):
        LatencyTable.load(out)
    table = profile(path, ProfileConfig(threads=1), out=out, measure=synthetic_timer(features, truth, second))
    assert len(first) + len(second) == len(table.data["measurements"])
    with pytest.raises(YoloslimError, match="another model or settings"):
        profile(path, ProfileConfig(threads=2), out=out, measure=synthetic_timer(features, truth, []))


def test_the_best_multiple_is_the_smallest_near_the_best_cost_per_work():
    assert best_multiple({1: (0.62, 0.30), 8: (0.50, 0.33), 16: (0.49, 0.33), 32: (0.60, 0.40)}) == 8
    assert best_multiple({1: (0.40, 0.30), 8: (0.50, 0.33)}) == 1


def test_predictor_is_bilinear_in_neighbouring_widths(tiny):
    """Halving both sides of a convolution quarters its work: what a sum of per-group terms would miss."""
    _, features = tiny
    only_c = np.zeros(len(features.names) + 1)
    only_c[1 + features.names.index("mac1x1@1024")] = 1.0  # b, c and the head are the 1x1 convs
    predict = Predictor(features, only_c)
    # 1x1 work, cin * cout: b 4 * 4, c 8 * 8, head 8 * 5 = 120 in the unpruned model
    assert predict({}) == pytest.approx(1.0)
    assert predict({"a.weight": 2}) == pytest.approx((2 * 2 + 4 * 8 + 8 * 5) / 120)
    assert predict({"c.weight": 4}) == pytest.approx((4 * 4 + 8 * 4 + 4 * 5) / 120)
    assert predict({"a.weight": 2, "c.weight": 4}) == pytest.approx((2 * 2 + 4 * 4 + 4 * 5) / 120)


def test_the_real_timer_profiles_a_tiny_model_without_torch(tmp_path):
    """One real run (ONNX Runtime) in a fresh interpreter: torch is never imported; the table is complete."""
    path = tiny_onnx(tmp_path / "tiny.onnx")
    code = (
        "import sys; from yoloslim.cli import main; "
        "rc = main(['profile', '--weights', sys.argv[1], '--threads', '1', '--rounds', '1', '--per-round', '1', "
        "'--fit-plans', '2', '--widths-per-group', '1']); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = LatencyTable.load(tmp_path / "tiny-latency-onnxruntime-fp32-1t.json")
    assert table.data["settings"]["threads"] == 1 and table.data["environment"]["onnxruntime"]
    assert len(table.data["check"]["errors"]) == 10 and table.reference_ms > 0
    assert "largest error" in done.stdout


def test_a_precision_the_onnx_does_not_carry_is_refused(tmp_path):
    with pytest.raises(YoloslimError, match="pass --precision fp32"):
        profile(tiny_onnx(tmp_path / "tiny.onnx"), ProfileConfig(precision="fp16"), out=tmp_path / "t.json")


def test_the_tensorrt_path_builds_each_copy_with_the_engine_builder(tmp_path, monkeypatch):
    """Through the TensorRT stand-in at the API boundary (tests/trt_standin.py): each narrowed copy goes through
    yoloslim's engine builder and runtime, and the table records the stand-in's version and GPU. It proves the calls
    and the bookkeeping, never an engine or a timing: those need a device (pytest -m jetson)."""
    from trt_standin import GPU, StandinCuda, make_tensorrt

    from yoloslim.runtime import cuda as cuda_module

    trt = make_tensorrt("10.3.0.30")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(cuda_module, "load_cuda", lambda: StandinCuda(trt))
    config = ProfileConfig(backend="tensorrt", rounds=1, per_round=1, fit_plans=1, widths_per_group=1)
    table = profile(tiny_onnx(tmp_path / "tiny.onnx"), config, out=tmp_path / "t.json", log=lambda s: None)
    assert len(trt.calls) == len(table.data["measurements"]) + 1  # and the unpruned model's engine
    assert all(call["builder_flags"] == [] for call in trt.calls)  # fp32
    env = table.data["environment"]
    assert env["tensorrt"] == "10.3.0.30" and env["compute_capability"] == GPU
    assert table.describe().startswith("tensorrt fp32")


def test_int8_weights_behind_a_dequantize_are_sliced_with_their_scales(tmp_path):
    """A Q/DQ model stores conv weights as int8 behind a DequantizeLinear with one scale per output channel: the
    weight, its scales and its zero points are narrowed together."""
    model = onnx.load(str(tiny_onnx(tmp_path / "tiny.onnx")))
    inits = {t.name: t for t in model.graph.initializer}
    weight = numpy_helper.to_array(inits["c.weight"])
    scale = np.abs(weight).reshape(8, -1).max(1) / 127
    quantized = np.round(weight / scale[:, None, None, None]).astype(np.int8)
    inits["c.weight"].CopyFrom(numpy_helper.from_array(quantized, "c.weight"))
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(scale.astype(np.float32), "c.scale"),
            numpy_helper.from_array(np.zeros(8, np.int8), "c.zero"),
        ]
    )
    conv = next(n for n in model.graph.node if n.name == "c")
    conv.input[1] = "c.dequantized"
    model.graph.node.insert(
        list(model.graph.node).index(conv),
        helper.make_node("DequantizeLinear", ["c.weight", "c.scale", "c.zero"], ["c.dequantized"], axis=0),
    )
    graph = read_groups(model)
    assert {g.root for g in graph.prunable} == {"a.weight", "c.weight"}
    sliced = slice_model(graph, {"a.weight": 3, "c.weight": 5})
    shapes = {t.name: tuple(t.dims) for t in sliced.graph.initializer}
    assert shapes["c.weight"] == (5, 6, 1, 1) and shapes["c.scale"] == shapes["c.zero"] == (5,)
    assert run(sliced).shape == (1, 5, 1024)


def test_without_the_onnx_package_profile_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as on a device with the base install only
    with pytest.raises(YoloslimError, match="pip install onnx"):
        profile(tmp_path / "model.onnx", ProfileConfig(), out=tmp_path / "t.json")


def test_an_interrupted_profile_continues_only_on_its_own_machine_by_any_path(tiny, tmp_path, monkeypatch):
    path, features = tiny
    truth = np.concatenate([[0.3], np.full(len(features.names), 0.05)])
    out = tmp_path / "t.json"
    with pytest.raises(KeyboardInterrupt):
        profile(path, ProfileConfig(threads=1), out=out, measure=synthetic_timer(features, truth, [], fail_after=3))
    saved = json.loads(out.read_text())
    other = {**saved, "environment": {**saved["environment"], "cpu": "Intel Xeon", "onnxruntime": "1.16.0"}}
    out.write_text(json.dumps(other))
    with pytest.raises(YoloslimError, match="another machine or runtime"):
        profile(path, ProfileConfig(threads=1), out=out, measure=synthetic_timer(features, truth, []))
    out.write_text(json.dumps(saved))
    monkeypatch.chdir(path.parent)  # the same model by a relative path
    table = profile(Path(path.name), ProfileConfig(threads=1), out=out, measure=synthetic_timer(features, truth, []))
    assert table.data["complete"]


@pytest.mark.parametrize("content", ["not json", "[1, 2]"])
def test_an_out_file_that_is_no_table_is_refused_in_one_line(content, tiny, tmp_path):
    path, features = tiny
    (tmp_path / "t.json").write_text(content)
    with pytest.raises(YoloslimError, match="not a latency table") as refused:
        profile(path, ProfileConfig(threads=1), out=tmp_path / "t.json", measure=synthetic_timer(features, [], []))
    assert len(str(refused.value).splitlines()) == 1


def test_a_file_that_is_no_onnx_is_refused_in_one_line(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(YoloslimError, match="not an ONNX model"):
        profile(junk, ProfileConfig(threads=1), out=tmp_path / "t.json")
