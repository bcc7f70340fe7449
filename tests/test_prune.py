import os
import re
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from yoloslim.graph import build_graph, group_in_convs, group_out_convs
from yoloslim.prune import PruneConfig, file_sha256, plan_pruning, prune, prune_model
from yoloslim.prune.apply import apply_plan, removed_batchnorm_channels, zeroed_gammas
from yoloslim.prune.plan import round_channels
from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.metadata import checkpoint_metadata


def random_model(nc: int = 3, cfg: str = "yolov5n.yaml", seed: int = 0) -> nn.Module:
    """A detection model with varied BatchNorm parameters and statistics, so removed channels carry real constants."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    return with_varied_batchnorms(DetectionModel(cfg, nc=nc, verbose=False))


def with_varied_batchnorms(model: nn.Module) -> nn.Module:
    """`model` in eval mode with random BatchNorm parameters and statistics (from torch's current seed)."""
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.0, 1.0)
            bn.bias.normal_(0, 0.3)
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def decoded(model, x):
    out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("method", ["bn", "l1"])
def test_without_compensation_pruning_equals_zeroed_activations(method):
    """Proves the channel bookkeeping across residual adds, concats and the head's inputs, borders included."""
    model = random_model()
    planned = plan_pruning(model, PruneConfig(method=method, ratio=0.5, compensate=False, imgsz=64))
    removed = removed_batchnorm_channels(planned.graph, planned.groups, planned.plans)
    sizes = [(64, 64), (96, 128), (160, 96)]
    inputs = [torch.rand(2, 3, h, w) for h, w in sizes]
    with torch.no_grad(), zeroed_gammas(removed, also_beta=True):  # SiLU(0) = 0: the activation is forced to zero
        expected = [decoded(model, x) for x in inputs]
    apply_plan(model, planned.graph, planned.groups, planned.plans, compensate=False)
    assert sum(len(p.removed) for p in planned.plans) > 0
    with torch.no_grad():
        for x, want in zip(inputs, expected):
            got = decoded(model, x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def _consumers(planned):
    """consuming conv -> (removed input channels, kept output channels), in the original numbering."""
    removed_in, kept_out = {}, {}
    for group, plan in zip(planned.groups, planned.plans):
        gone = set(plan.removed)
        for conv, idxs, roots in group_in_convs(planned.graph, group):
            removed_in.setdefault(conv, set()).update(i for i, r in zip(idxs, roots) if r in gone)
        for conv, idxs, roots in group_out_convs(planned.graph, group):
            kept_out[conv] = [i for i, r in zip(idxs, roots) if r not in gone]
    return {c: (sorted(r), kept_out.get(c)) for c, r in removed_in.items() if r}


def _compensated_layers(model, planned, x):
    """Prune with compensation; per consumer: its kept inputs in the zero-gamma model, its output now and there."""
    consumers = _consumers(planned)
    wrapper = {m.conv: m for m in model.modules() if isinstance(getattr(m, "conv", None), nn.Conv2d)}
    layer = {conv: wrapper.get(conv, conv) for conv in consumers}  # conv+BN+act, or a bare conv with bias
    seen = {}
    hooks = [layer[c].register_forward_hook(lambda m, a, o: seen.__setitem__(m, (a[0], o))) for c in consumers]
    with torch.no_grad(), zeroed_gammas(removed_batchnorm_channels(planned.graph, planned.groups, planned.plans)):
        model(x)
    for h in hooks:
        h.remove()
    apply_plan(model, planned.graph, planned.groups, planned.plans, compensate=True)
    for conv, (removed_in, kept_out) in consumers.items():
        x_ref, y_ref = seen[layer[conv]]
        x_kept = x_ref[:, [i for i in range(x_ref.shape[1]) if i not in set(removed_in)]]
        with torch.no_grad():
            yield conv, x_kept, layer[conv](x_kept), y_ref if kept_out is None else y_ref[:, kept_out]


def test_compensation_reproduces_zero_gamma_model_layer_by_layer():
    model = random_model()
    planned = plan_pruning(model, PruneConfig(ratio=0.5, imgsz=64))
    checked = 0
    for conv, _, y, want in _compensated_layers(model, planned, torch.rand(1, 3, 128, 128)):
        p = conv.padding[0]
        interior = (slice(None), slice(None), slice(p, y.shape[2] - p), slice(p, y.shape[3] - p))
        torch.testing.assert_close(y[interior], want[interior], rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("cfg", ["yolov5n.yaml", "yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"])
def test_compensation_through_a_kept_zero_gamma_channel_is_exact_at_the_borders_too(cfg):
    """Zero-gamma channels kept by rounding carry the removed constants, so zero padding cannot tell the difference."""
    model = random_model(cfg=cfg, seed=1)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight[torch.rand(bn.num_features) < 0.6] = 0
    planned = plan_pruning(model, PruneConfig(threshold=1e-6, round_to=8, imgsz=64))
    checked = 0
    for conv, x_kept, y, want in _compensated_layers(model, planned, torch.rand(1, 3, 96, 96)):
        flat = x_kept[0].flatten(1)
        if conv.kernel_size[0] == 1 or not bool(((flat.amax(1) == flat.amin(1)) & (flat[:, 0].abs() > 1e-3)).any()):
            continue  # a 1x1 conv has no padding; without a constant kept input the fold is exact on the interior only
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked >= 5


def test_every_conv_and_batchnorm_is_consistent():
    result = prune_model(random_model(nc=80), PruneConfig(ratio=0.6, imgsz=64))
    for m in result.model.modules():
        if isinstance(getattr(m, "conv", None), nn.Conv2d) and isinstance(getattr(m, "bn", None), nn.BatchNorm2d):
            assert m.conv.out_channels == m.bn.num_features == m.bn.running_mean.numel()
    head = result.model.model[-1]
    assert [b[-1].out_channels for b in head.cv2] == [64] * 3 and [b[-1].out_channels for b in head.cv3] == [80] * 3
    assert result.after["gflops"] < 0.75 * result.before["gflops"]


@pytest.mark.parametrize("round_to", [1, 8, 32])
def test_guards_min_keep_and_rounding(round_to):
    result = prune_model(random_model(), PruneConfig(ratio=0.9, min_keep=0.25, round_to=round_to, imgsz=64))
    pruned_layers = 0
    for name, (before, after) in result.widths.items():
        assert after >= min(before, round_to) and after >= 0.25 * before - 1e-9
        if before > round_to and after < before:
            assert after % round_to == 0, name
            pruned_layers += 1
    assert pruned_layers > 0
    assert round_channels(9, 64, 8) == 16 and round_channels(0, 64, 8) == 8 and round_channels(3, 4, 8) == 4


def assert_threshold_and_target_flops(model: nn.Module, least_removed: float):
    """A threshold removes the channels under it, a GFLOPs target is met, an unreachable one is refused naming the
    nearest reachable value; returns that refusal."""
    by_threshold = prune_model(model, PruneConfig(threshold=0.5, round_to=1, min_keep=0.0, imgsz=64))
    assert by_threshold.threshold == 0.5 and least_removed < by_threshold.removed_fraction < 0.7
    target = prune_model(model, PruneConfig(target_flops=0.5, imgsz=64))
    assert target.after["gflops"] <= 0.5 * target.before["gflops"] + 1e-6
    with pytest.raises(YoloslimError, match="cannot be reached.*smallest reachable") as refused:
        prune_model(model, PruneConfig(target_flops=0.01, min_keep=0.5, imgsz=64))
    return refused


@pytest.mark.slow
def test_threshold_and_target_flops():
    model = random_model()
    refused = assert_threshold_and_target_flops(model, least_removed=0.3)
    nearest = float(re.search(r"keeps ([0-9.]+) of the GFLOPs", str(refused.value)).group(1))
    assert prune_model(model, PruneConfig(target_flops=nearest, min_keep=0.5, imgsz=64)).after["gflops"] > 0
    with pytest.raises(
        YoloslimError, match="cannot be reached"
    ):  # and it is the nearest: a step below is not reachable
        prune_model(model, PruneConfig(target_flops=nearest - 0.001, min_keep=0.5, imgsz=64))


@pytest.mark.parametrize(
    "bad",
    [
        dict(ratio=1.0),
        dict(ratio=0.3, threshold=0.1),
        dict(target_flops=0.0),
        dict(round_to=0),
        dict(method="taylor"),
        dict(imgsz=600),
        dict(imgsz=16),
    ],
)
def test_bad_settings_are_refused(bad):
    with pytest.raises(YoloslimError):
        PruneConfig(**bad)


def test_tracing_leaves_the_model_unchanged():
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov5n.yaml", nc=2, verbose=False).eval()
    before = deepcopy(model.state_dict())
    build_graph(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(m.training for m in model.modules())


# -- the checkpoint ---------------------------------------------------------------------------------------------------


def save_as_ultralytics_would(model: nn.Module, path: Path) -> Path:
    """A checkpoint as Ultralytics writes it (EMA half model, train_args, class names)."""
    from ultralytics.utils import DEFAULT_CFG_DICT

    model = deepcopy(model).half()
    model.args = dict(DEFAULT_CFG_DICT)
    model.names = {i: f"c{i}" for i in range(model.model[-1].nc)}
    torch.save(
        {"model": None, "ema": model, "train_args": dict(DEFAULT_CFG_DICT), "epoch": -1, "version": "8.4.190"}, path
    )
    return path


def assert_plain_ultralytics_loads(weights: Path, image: Path, cwd: Path) -> None:
    """YOLO(weights) predicts in a fresh interpreter without yoloslim importable, also with safe loading."""
    probe = (
        "import sys; from ultralytics import YOLO; m = YOLO(sys.argv[1]); "
        "assert 'yoloslim' not in sys.modules; r = m.predict(sys.argv[2], imgsz=64, verbose=False); print(len(r))"
    )
    for safe in ("0", "1"):
        env = {**os.environ, "ULTRALYTICS_SAFE_LOAD": safe, "PYTHONPATH": "", "YOLO_OFFLINE": "1"}
        done = subprocess.run(
            [sys.executable, "-c", probe, str(weights), str(image)],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]


def assert_onnx_export_matches(weights: Path, imgsz: int = 64, **export_args) -> Path:
    """Ultralytics' own ONNX export runs, and ONNX Runtime gives what the checkpoint gives in PyTorch; returns it."""
    import onnxruntime as ort
    from ultralytics import YOLO

    model = YOLO(str(weights))
    onnx_path = Path(model.export(format="onnx", imgsz=imgsz, opset=17, simplify=False, dynamic=False, **export_args))
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    torch_model = YOLO(str(weights)).model.float().eval()
    selected = export_args.get("nms") is False  # an end-to-end head's selected boxes, not the per-anchor output
    torch_model.end2end = selected
    with torch.no_grad():
        want = decoded(torch_model, torch.from_numpy(x)).numpy()
    if selected:  # near-equal scores may be selected in another order: match each box to its nearest
        distance = np.abs(got[0][:, None] - want[0][None]).max(-1)
        assert len(set(distance.argmin(0).tolist())) == len(want[0])
        got = got[:, distance.argmin(0)]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    return onnx_path


@pytest.fixture(scope="module")
def trained_pt(tmp_path_factory):
    """A checkpoint as Ultralytics writes it, from random but varied weights."""
    return save_as_ultralytics_would(random_model(nc=6), tmp_path_factory.mktemp("w") / "best.pt")


def test_dry_run_writes_nothing_and_input_is_untouched(trained_pt):
    digest, files = file_sha256(trained_pt), set(trained_pt.parent.iterdir())
    result = prune(trained_pt, PruneConfig(ratio=0.5, imgsz=64), dry_run=True)
    assert result.out is None and set(trained_pt.parent.iterdir()) == files
    assert file_sha256(trained_pt) == digest
    for out, problem in ((trained_pt, "is the input file"), (trained_pt.with_name("pruned"), "must end in .pt")):
        with pytest.raises(YoloslimError, match=problem):
            prune(trained_pt, PruneConfig(ratio=0.5, imgsz=64), out=out)
    assert file_sha256(trained_pt) == digest and set(trained_pt.parent.iterdir()) == files


@pytest.mark.slow
def test_pruned_checkpoint_is_an_ordinary_ultralytics_checkpoint(trained_pt, tiny_data, tmp_path):

    digest = file_sha256(trained_pt)
    out = tmp_path / "pruned.pt"
    result = prune(trained_pt, PruneConfig(ratio=0.5, imgsz=64), out=out)
    assert file_sha256(trained_pt) == digest and result.out == out
    assert out.with_name("pruned-report.md").read_text().count("|") > 20
    assert out.with_name("pruned-report.png").stat().st_size > 0

    ckpt = torch.load(out, weights_only=False)
    meta = checkpoint_metadata(ckpt)["prune"]
    assert meta["source_sha256"] == digest and meta["settings"]["ratio"] == 0.5
    assert any(b != a for b, a in meta["widths"].values())
    assert {type(m).__module__.split(".")[0] for m in ckpt["model"].modules()} <= {"torch", "ultralytics"}

    image = next((Path(tiny_data).parent / "images" / "val").glob("*.jpg"))
    assert_plain_ultralytics_loads(out, image, tmp_path)
    assert_onnx_export_matches(out)


@pytest.mark.slow
def test_pruning_zeroed_channels_keeps_the_map_plain_ultralytics_measures(
    shipped_sparse_weights, synthetic_data, tmp_path
):
    """About 40 % of the GFLOPs of the shipped sparse model are channels whose gamma sparsity training drove to zero:
    removed, with their constant output folded into the next layer, they leave the detections as they were."""
    from ultralytics import YOLO

    pruned = prune(shipped_sparse_weights, PruneConfig(threshold=1e-2, imgsz=64), out=tmp_path / "pruned.pt")
    assert pruned.after["gflops"] <= 0.7 * pruned.before["gflops"]
    before, after = (
        YOLO(str(weights))
        .val(data=str(synthetic_data), imgsz=320, batch=8, plots=False, verbose=False, project=str(tmp_path), name="v")
        .box.map
        for weights in (shipped_sparse_weights, pruned.out)
    )
    assert before > 0.3 and abs(after - before) < 0.005


@pytest.mark.slow
def test_a_repeated_prune_keeps_the_history(trained_pt, tmp_path):
    once = prune(trained_pt, PruneConfig(ratio=0.3, imgsz=64), out=tmp_path / "once.pt").out
    twice = prune(once, PruneConfig(ratio=0.2, imgsz=64), out=tmp_path / "twice.pt").out
    meta = checkpoint_metadata(torch.load(twice, weights_only=False))
    assert meta["prune"]["settings"]["ratio"] == 0.2 and meta["prune"]["source"] == str(once)
    assert [p["settings"]["ratio"] for p in meta["earlier_prunes"]] == [0.3]


def test_pruning_the_shipped_weights_writes_under_runs(monkeypatch, tmp_path):
    from yoloslim.prune import default_output
    from yoloslim.utils.assets import SPARSE_BASELINE, shipped_file

    monkeypatch.chdir(tmp_path)
    assert default_output(shipped_file("weights", SPARSE_BASELINE)) == Path(
        "runs/prune/yolov5n-synthetic-sparse-pruned.pt"
    )
    assert default_output(tmp_path / "best.pt") == tmp_path / "best-pruned.pt"


def test_ratio_holds_when_scores_tie():
    """A model never sparsity-trained can have equal gammas everywhere; the global ratio must still hold."""
    model = random_model()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.fill_(1.0)
    result = prune_model(model, PruneConfig(ratio=0.3, round_to=1, min_keep=0.0, imgsz=64))
    assert result.removed_fraction == pytest.approx(0.3, abs=0.01)


def test_a_quantization_aware_model_is_refused_with_the_float_route():
    from ultralytics.nn.tasks import DetectionModel

    from yoloslim.export.fakequant import FakeQuant
    from yoloslim.graph import check_supported

    model = DetectionModel("yolov5n.yaml", nc=2, verbose=False)
    model.model[0].act = nn.Sequential(model.model[0].act, FakeQuant("x", 0.1, 0, -128, 127))
    with pytest.raises(YoloslimError, match="quantization-aware.*float model") as refused:
        check_supported(model)
    assert len(str(refused.value).splitlines()) == 1
