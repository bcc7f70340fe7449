"""Pruning the original YOLOv5 repository's anchor-based models: the coupling rules of yoloslim.graph proved on
models built by yoloslim's classic definition, and the pruned checkpoint written in the original's own format."""

import ast
import os
import pickletools
import subprocess
import sys
import zipfile
from copy import deepcopy
from pathlib import Path

import pytest
import torch
from test_classic import FIXTURES, unpickle_raw
from test_prune import _compensated_layers, assert_threshold_and_target_flops, with_varied_batchnorms
from torch import nn

from yoloslim.graph import model_stats, prunable_batchnorms
from yoloslim.models import DetectionModel, load_classic_checkpoint, unpickle
from yoloslim.prune import PruneConfig, file_sha256, plan_pruning, prune, prune_model
from yoloslim.prune.apply import apply_plan, removed_batchnorm_channels, zeroed_gammas
from yoloslim.utils.metadata import checkpoint_metadata

# yolov5n.yaml (v6.0 and later: Conv stem, C3, SPPF), and the earlier layout (Focus, BottleneckCSP, SPP), each as the
# fixtures' checkpoints record it; built here at width 1/8 (8 to 128 channels), so every layer has channels to lose.
LAYOUTS = {"v7.0": "v7.0-best", "v5.0": "v5.0-best"}
SIZES = [(64, 64), (96, 128), (160, 96)]


pytestmark = pytest.mark.usefixtures("one_thread")


def classic_model(layout: str = "v7.0", seed: int = 0) -> DetectionModel:
    """A classic model built by yoloslim from a fixture's yaml, with varied BatchNorm parameters and statistics, so
    that removed channels carry real constants."""
    spec = deepcopy(load_classic_checkpoint(FIXTURES / f"{LAYOUTS[layout]}.pt")[0].yaml)
    spec["width_multiple"] = 0.125
    torch.manual_seed(seed)
    return with_varied_batchnorms(DetectionModel(spec))


def head_convs(model: DetectionModel) -> list[nn.Conv2d]:
    return list(model.model[-1].m)


def outputs(model: DetectionModel, x: torch.Tensor) -> list[torch.Tensor]:
    """The eval-mode boxes and every level's raw map."""
    boxes, raw = model(x)
    return [boxes, *raw]


def types_named(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules()}


@pytest.mark.parametrize("method", ["bn", "l1"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_compensation_pruning_equals_zeroed_activations(layout, method):
    """Proves the coupling through residual adds, C3's and BottleneckCSP's concats, SPP(F), Focus, the upsampled
    concats and the anchor head's inputs, borders included, at several image sizes."""
    model = classic_model(layout)
    assert ({"C3", "SPPF"} if layout == "v7.0" else {"Focus", "BottleneckCSP", "SPP"}) <= types_named(model)
    planned = plan_pruning(model, PruneConfig(method=method, ratio=0.5, compensate=False, imgsz=64))
    removed = removed_batchnorm_channels(planned.graph, planned.groups, planned.plans)
    inputs = [torch.rand(2, 3, h, w) for h, w in SIZES]
    with torch.no_grad(), zeroed_gammas(removed, also_beta=True):  # SiLU(0) = 0: the activation is forced to zero
        expected = [outputs(model, x) for x in inputs]
    head_before = [(c.in_channels, c.out_channels) for c in head_convs(model)]
    apply_plan(model, planned.graph, planned.groups, planned.plans, compensate=False)
    head_after = [(c.in_channels, c.out_channels) for c in head_convs(model)]
    assert [o for _, o in head_after] == [o for _, o in head_before] == [3 * (5 + 3)] * len(head_before)
    assert all(after < before for (after, _), (before, _) in zip(head_after, head_before))  # their inputs shrank
    with torch.no_grad():
        for x, want in zip(inputs, expected):
            for got, wanted in zip(outputs(model, x), want, strict=True):
                torch.testing.assert_close(got, wanted, rtol=1e-4, atol=1e-4 * float(wanted.abs().max()))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compensation_reproduces_zero_gamma_model_layer_by_layer(layout):
    model = classic_model(layout)
    planned = plan_pruning(model, PruneConfig(ratio=0.5, round_to=1, imgsz=64))  # BottleneckCSP's 8 channels too
    names = {m: n for n, m in model.named_modules()}
    checked = []
    for conv, _, y, want in _compensated_layers(model, planned, torch.rand(1, 3, 128, 128)):
        p = conv.padding[0]
        interior = (slice(None), slice(None), slice(p, y.shape[2] - p), slice(p, y.shape[3] - p))
        torch.testing.assert_close(y[interior], want[interior], rtol=1e-4, atol=1e-4)
        checked.append(names[conv])
    head = f"model.{len(model.model) - 1}.m."
    assert sum(n.startswith(head) for n in checked) == len(model.model[-1].m)  # every output conv, biases folded
    if layout == "v5.0":  # BottleneckCSP's bare convolutions: cv3 behind the bottlenecks, cv2 on the block's input
        assert any(n.endswith(".cv3") for n in checked) and any(n.endswith(".cv2") for n in checked)
    assert len(checked) >= 15


@pytest.mark.parametrize("round_to", [1, 8])
def test_guards_min_keep_and_rounding(round_to):
    result = prune_model(classic_model(), PruneConfig(ratio=0.9, min_keep=0.25, round_to=round_to, imgsz=64))
    head = f"model.{len(result.model.model) - 1}.m."
    pruned_layers = 0
    for name, (before, after) in result.widths.items():
        if name.startswith(head):
            assert after == before, name
            continue
        assert after >= min(before, round_to) and after >= 0.25 * before - 1e-9, name
        if before > round_to and after < before:
            assert after % round_to == 0, name
            pruned_layers += 1
    assert pruned_layers > 10


@pytest.mark.slow
def test_threshold_and_target_flops():
    assert_threshold_and_target_flops(classic_model(), least_removed=0.3)


def test_gflops_of_a_focus_stem_are_counted():
    """Ultralytics' count reads the image's channels off the first weight, which a Focus stem has four times over,
    and then counts nothing (0); yoloslim's count feeds the model an image of the yaml's channels."""
    focus = classic_model("v5.0")
    gflops = model_stats(focus, 64)["gflops"]
    assert gflops > 0 and model_stats(focus, 128)["gflops"] == pytest.approx(4 * gflops, rel=1e-2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sparsity_penalises_every_batchnorm_of_a_classic_model(layout):
    """The anchor head has no BatchNorm and nothing else is fixed: every BatchNorm can shrink, BottleneckCSP's shared
    one (two convolutions' outputs) included."""
    from yoloslim.sparsity import prunable_batchnorms as penalised

    model = classic_model(layout)
    every = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert [n for n, _ in prunable_batchnorms(model)] == every
    assert [n for n, _ in penalised(model)] == every
    if layout == "v5.0":
        assert "model.2.bn" in every


# -- the checkpoint, in the original's format ------------------------------------------------------------------------

CHECKPOINTS = ["v7.0-best", "v6.2-last", "v6.0-best", "v5.0-best"]


def pickled_globals(path: Path) -> set[str]:
    """Every global the checkpoint's pickle names, read with pickletools (nothing is unpickled)."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> dict:
    """Each fixture checkpoint pruned by `prune` (its copy, with its digest and its result)."""
    found = {}
    for name in CHECKPOINTS:
        folder = tmp_path_factory.mktemp(name)
        weights = folder / f"{name}.pt"
        weights.write_bytes((FIXTURES / f"{name}.pt").read_bytes())
        found[name] = (weights, prune(weights, PruneConfig(ratio=0.5, round_to=1, imgsz=64)))
    return found


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_the_pruned_checkpoint_pickles_the_inputs_classes_keys_and_fp16_weights(name, pruned):
    weights, result = pruned[name]
    out = result.out
    assert out == weights.with_name(f"{name}-pruned.pt") and file_sha256(weights) == file_sha256(
        FIXTURES / weights.name
    )
    found, given = pickled_globals(out), pickled_globals(weights)
    originals = {g for g in found if g.startswith("models.")}
    assert originals == {g for g in given if g.startswith("models.")}  # models.yolo.Model up to v6.1's files
    assert (
        originals
        and not {g for g in found if "yoloslim" in g}
        and found
        <= set(unpickle.ALLOWED)
        | {
            "torch.HalfStorage",
            "torch.FloatStorage",
            "torch.LongStorage",
        }
    )
    stored, source = unpickle_raw(out), unpickle_raw(weights)
    assert list(stored) == list(source)
    assert stored["epoch"] == -1 and all(stored[k] is None for k in ("optimizer", "best_fitness", "ema", "updates"))
    assert {k: stored[k] for k in ("opt", "git", "date") if k in source} == {
        k: source[k] for k in ("opt", "git", "date") if k in source
    }
    model = stored["model"]
    assert model.names == (source["ema"] or source["model"]).names
    source_types = {k: v.dtype for k, v in (source["ema"] or source["model"]).state_dict().items()}
    saved_types = {k: v.dtype for k, v in model.state_dict().items()}
    shared = saved_types.keys() & source_types.keys()
    assert {k: saved_types[k] for k in shared} == {k: source_types[k] for k in shared}
    # a plain conv gets a bias where compensation folds into it (BottleneckCSP's cv2 and cv3); before v6.0 the head's
    # anchor_grid was a buffer, which the original's loader since v6.0 replaces by a list, as yoloslim's does
    assert all(k.endswith(".bias") and saved_types[k] == torch.float16 for k in saved_types.keys() - shared)
    assert {k.rsplit(".", 1)[-1] for k in source_types.keys() - shared} <= {"anchor_grid"}
    assert {p.dtype for p in model.parameters()} == {torch.float16} and not any(
        p.requires_grad for p in model.parameters()
    )
    meta = checkpoint_metadata(stored)["prune"]
    assert meta["source_sha256"] == file_sha256(weights) and meta["settings"]["ratio"] == 0.5
    assert any(before != after for before, after in meta["widths"].values())


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_yoloslims_loader_reads_the_pruned_checkpoint_back(name, pruned):
    _, result = pruned[name]
    loaded, _ = load_classic_checkpoint(result.out)
    assert isinstance(loaded, DetectionModel) and [c.out_channels for c in head_convs(loaded)] == [
        c.out_channels for c in head_convs(result.model)
    ]
    layers = list(loaded.model)
    assert [layer.np for layer in layers] == [sum(p.numel() for p in layer.parameters()) for layer in layers]
    as_saved = deepcopy(result.model).half().float()  # the checkpoint holds FP16 weights, as the original's do
    x = torch.rand(1, 3, 96, 64)
    with torch.no_grad():
        for got, want in zip(outputs(loaded, x), outputs(as_saved, x), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_an_anchor_grid_buffer_is_saved_as_its_levels(pruned):
    """Before v6.0 the head's anchor_grid was a buffer, which those releases' code reads; since v6.0 it is a list that
    the code recomputes. The pruned file holds the list, with the buffer's values, which both read."""
    weights, result = pruned["v5.0-best"]
    buffer = unpickle_raw(weights)["model"].model[-1].anchor_grid
    saved = unpickle_raw(result.out)["model"].model[-1].anchor_grid
    assert isinstance(buffer, torch.Tensor) and isinstance(saved, list) and len(saved) == len(buffer)
    assert all(torch.equal(level, want) for level, want in zip(saved, buffer))


def test_a_repeated_prune_keeps_the_history(pruned, tmp_path):
    once = pruned["v6.0-best"][1].out
    twice = prune(once, PruneConfig(ratio=0.2, imgsz=64), out=tmp_path / "twice.pt").out
    meta = checkpoint_metadata(unpickle_raw(twice))
    assert meta["prune"]["settings"]["ratio"] == 0.2 and meta["prune"]["source"] == str(once)
    assert [p["settings"]["ratio"] for p in meta["earlier_prunes"]] == [0.5]
    assert "models.yolo.Model" in pickled_globals(twice)


STAND_INS = {
    "common": ["Conv", "Bottleneck", "C3", "SPPF", "Concat", "Focus", "SPP", "BottleneckCSP"],
    "yolo": ["Detect", "Model", "DetectionModel"],
}


@pytest.mark.slow
def test_it_unpickles_into_the_original_packages_classes_without_importing_yoloslim(pruned, tmp_path):
    """A stand-in for the original repository's `models` package (bare classes of its names) on the path: the pruned
    checkpoint unpickles into those classes, and yoloslim is never imported."""
    out = pruned["v5.0-best"][1].out
    package = tmp_path / "models"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for module, classes in STAND_INS.items():
        body = "from torch import nn\n" + "".join(f"class {c}(nn.Module):\n    pass\n" for c in classes)
        (package / f"{module}.py").write_text(body)
    probe = (
        "import sys, torch; ckpt = torch.load(sys.argv[1], map_location='cpu', weights_only=False); "
        "assert not [m for m in sys.modules if m.startswith('yoloslim')]; "
        "print(sorted({f'{type(m).__module__}.{type(m).__name__}' for m in ckpt['model'].modules()}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(out)],
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = {name for name in ast.literal_eval(done.stdout) if name.startswith("models.")}
    assert found == {g for g in pickled_globals(out) if g.startswith("models.")}
    assert {"models.common.Focus", "models.common.BottleneckCSP", "models.yolo.Model"} <= found


# -- what the command refuses ----------------------------------------------------------------------------------------


def truncated(folder: Path) -> Path:
    data = (FIXTURES / "v7.0-best.pt").read_bytes()
    path = folder / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda folder: FIXTURES / "v7.0-ghost.pt", ["models.common.GhostConv", "does not implement"]),
        (lambda folder: FIXTURES / "v7.0-segment.pt", ["segmentation checkpoint"]),
        (lambda folder: FIXTURES / "v7.0-classify.pt", ["classification checkpoint"]),
        (truncated, []),
    ],
)
def test_prune_refuses_bad_input_in_one_line_and_writes_nothing(cli, tmp_path, make, words):
    source = make(tmp_path)
    weights = tmp_path / source.name
    if source != weights:
        weights.write_bytes(source.read_bytes())
    code, err, _ = cli("prune", "--weights", weights, "--ratio", "0.5", "--imgsz", "64")
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("yoloslim prune: error:"), err
    assert all(word in err for word in words), err
    assert list(tmp_path.iterdir()) == [weights]


def test_the_command_prunes_a_classic_checkpoint(cli, tmp_path):
    weights = tmp_path / "best.pt"
    weights.write_bytes((FIXTURES / "v7.0-best.pt").read_bytes())
    code, err, printed = cli(
        "prune", "--weights", weights, "--ratio", "0.4", "--method", "l1", "--round-to", "1", "--imgsz", "64"
    )
    assert code == 0, err
    out = tmp_path / "best-pruned.pt"
    assert f"wrote {out}" in printed and out.with_name("best-pruned-report.md").is_file()
    stats = checkpoint_metadata(unpickle_raw(out))["prune"]
    assert stats["settings"]["method"] == "l1" and stats["after"]["gflops"] < stats["before"]["gflops"]
    assert load_classic_checkpoint(out)[0].model[-1].m[0].out_channels == 3 * (5 + 3)
