"""yoloslim's classic YOLOv5 models against the original repository's own code, through the committed fixtures that
tools/make_classic_fixtures.py made with it (docs/classic-yolov5.md). Nothing here imports the original."""

import argparse
import io
import os
import pathlib
import pickle
import subprocess
import sys
import types
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from yoloslim.models import Detect, DetectionModel, load_classic_checkpoint, unpickle, yolov5_layout
from yoloslim.utils.errors import YoloslimError

FIXTURES = Path(__file__).parent / "fixtures" / "classic"
# checkpoints of the releases v7.0 (trained by its train.py), v6.2 (an unfinished last.pt), v6.0, and v5.0 with the
# earlier Focus, BottleneckCSP and SPP modules
DETECTION = ["v7.0-best", "v6.2-last", "v6.0-best", "v5.0-best"]


@pytest.fixture(scope="module")
def images():
    with np.load(FIXTURES / "inputs.npz") as inputs:
        return {name: torch.from_numpy(inputs[name]).float() / 255 for name in inputs.files}


def reference(name: str) -> dict:
    with np.load(FIXTURES / f"{name}.npz") as loaded:
        return dict(loaded)


def outputs(model: nn.Module, x: torch.Tensor) -> dict:
    """What the fixtures record for an image: eval-mode boxes and training-mode raw maps (on a copy: training mode
    updates BatchNorm statistics)."""
    with torch.no_grad():
        found = {"boxes": model.eval()(x)[0]}
        found.update({f"train{i}": level for i, level in enumerate(deepcopy(model).train()(x))})
    return found


def assert_matches_reference(model: nn.Module, name: str, images: dict) -> None:
    expected = reference(name)
    for image, x in images.items():
        found = outputs(model, x)
        assert {f"{image}_{key}" for key in found} == {key for key in expected if key.startswith(f"{image}_")}
        for key, value in found.items():
            # 1e-5 of the output's scale: float32 sums in another order (another thread count) differ by about 1e-6
            want = expected[f"{image}_{key}"]
            np.testing.assert_allclose(value.numpy(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=key)


def assert_one_line(error: pytest.ExceptionInfo, *words: str) -> None:
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("name", DETECTION)
def test_checkpoints_load_without_the_original_repository(name):
    model, ckpt = load_classic_checkpoint(FIXTURES / f"{name}.pt")
    assert not [m for m in sys.modules if m == "models" or m.startswith("models.")]
    assert isinstance(model, DetectionModel) and isinstance(model.model[-1], Detect)
    assert {type(m).__module__.split(".")[0] for m in model.modules()} == {"yoloslim", "torch"}
    assert not model.training and model.names and ckpt["epoch"] is not None


@pytest.mark.parametrize("name", DETECTION)
def test_outputs_equal_the_original_implementations(name, images):
    model, _ = load_classic_checkpoint(FIXTURES / f"{name}.pt")
    assert_matches_reference(model, name, images)


@pytest.mark.parametrize("name", ["v7.0-best", "v5.0-best"])
def test_fp16_weights_load_as_float32_without_loss(name):
    pickled = unpickle_raw(FIXTURES / f"{name}.pt")
    assert {p.dtype for p in pickled["model"].parameters()} == {torch.float16}
    stored = pickled["model"].state_dict()
    model, _ = load_classic_checkpoint(FIXTURES / f"{name}.pt")
    for key, loaded in model.state_dict().items():
        if loaded.is_floating_point():
            assert loaded.dtype == torch.float32 and torch.equal(loaded, stored[key].float()), key


def unpickle_raw(path: Path) -> dict:
    """The checkpoint exactly as stored (no conversion), through the same restricted unpickler."""
    return torch.load(path, map_location="cpu", pickle_module=unpickle, weights_only=False)


def test_an_unfinished_last_pt_runs_its_ema_model(images):
    model, ckpt = load_classic_checkpoint(FIXTURES / "v6.2-last.pt")
    assert model is ckpt["ema"]
    expected = reference("v6.2-last")["image0_boxes"]
    trained_weights = outputs(ckpt["model"].float(), images["image0"])["boxes"].numpy()
    assert not np.allclose(trained_weights, expected, rtol=1e-3)  # the fixture tells the two apart


def test_what_train_py_stores_beside_the_model_comes_through():
    _, last = load_classic_checkpoint(FIXTURES / "v6.2-last.pt")
    assert isinstance(last["best_fitness"], np.ndarray) and last["wandb_id"] is None
    assert {type(v) for v in last["opt"].values() if isinstance(v, pathlib.PurePath)} == {pathlib.PurePosixPath}
    momentum = [s["momentum_buffer"] for s in last["optimizer"]["state"].values()]
    assert momentum and all(isinstance(t, torch.Tensor) for t in momentum)
    _, best = load_classic_checkpoint(FIXTURES / "v7.0-best.pt")
    assert best["ema"] is None and best["optimizer"] is None and isinstance(best["opt"], dict)
    assert set(best["git"]) == {"remote", "branch", "commit"} and isinstance(best["date"], str)


def test_an_opt_namespace_with_windows_paths_loads_anywhere(tmp_path):
    class WrittenOnWindows:  # pickles as pathlib.WindowsPath, which cannot be instantiated on other systems
        def __reduce__(self):
            return pathlib.WindowsPath, ("C:\\", "runs", "train")

    torch.save({"opt": argparse.Namespace(save_dir=WrittenOnWindows())}, tmp_path / "opt.pt")
    opt = unpickle_raw(tmp_path / "opt.pt")["opt"]
    assert isinstance(opt, argparse.Namespace) and opt.save_dir == pathlib.PureWindowsPath("C:/runs/train")


@pytest.mark.parametrize("name", DETECTION)
def test_a_model_built_from_the_yaml_starts_as_the_originals_does(name):
    loaded, _ = load_classic_checkpoint(FIXTURES / f"{name}.pt")
    torch.manual_seed(0)
    built = DetectionModel(loaded.yaml)
    state = built.state_dict()
    expected = reference(name)
    assert list(state) == list(expected["fresh_names"])
    for statistic in ("sum", "abs"):
        found = [(v.double().abs() if statistic == "abs" else v.double()).sum().item() for v in state.values()]
        np.testing.assert_allclose(found, expected[f"fresh_{statistic}"], rtol=1e-6, err_msg=statistic)
    assert torch.equal(built.model[-1].stride, loaded.model[-1].stride)
    norms = [(m.eps, m.momentum) for m in loaded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [(m.eps, m.momentum) for m in built.modules() if isinstance(m, nn.BatchNorm2d)] == norms


# Not v5.0-best: a yaml builds v7.0's modules, whose BottleneckCSP activates with SiLU where v5.0's used LeakyReLU.
@pytest.mark.parametrize("name", DETECTION[:3])
def test_a_model_built_from_the_yaml_runs_the_checkpoint_weights_as_the_original(name, images):
    loaded, _ = load_classic_checkpoint(FIXTURES / f"{name}.pt")
    built = DetectionModel(loaded.yaml)
    built.load_state_dict(loaded.state_dict())
    assert_matches_reference(built, name, images)


def test_the_built_in_layout_is_the_one_the_original_yolov5n_yaml_describes():
    """v7.0-best.pt was trained by the original's train.py from its yolov5n.yaml at width 1/32 with 3 classes."""
    recorded, _ = load_classic_checkpoint(FIXTURES / "v7.0-best.pt")
    expected = {k: v for k, v in recorded.yaml.items() if k != "ch"}
    layout = yolov5_layout("n", nc=3)
    assert layout["width_multiple"] == 0.25
    assert dict(layout, width_multiple=expected["width_multiple"]) == expected
    with pytest.raises(YoloslimError) as error:
        yolov5_layout("q")
    assert_one_line(error, "'q'")


def test_a_yaml_module_outside_the_classic_set_is_refused():
    loaded, _ = load_classic_checkpoint(FIXTURES / "v6.0-best.pt")
    spec = deepcopy(loaded.yaml)
    spec["backbone"][1][2] = "GhostConv"
    with pytest.raises(YoloslimError) as error:
        DetectionModel(spec)
    assert_one_line(error, "GhostConv")


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("v7.0-segment", ["segmentation checkpoint", "models.yolo.SegmentationModel", "detection"]),
        ("v7.0-classify", ["classification checkpoint", "models.yolo.ClassificationModel", "detection"]),
        ("v7.0-ghost", ["models.common.GhostConv", "does not implement"]),
    ],
)
def test_other_tasks_and_modules_are_refused_by_name(name, words):
    with pytest.raises(YoloslimError) as error:
        load_classic_checkpoint(FIXTURES / f"{name}.pt")
    assert_one_line(error, *words)


def test_a_file_that_would_run_code_is_refused_before_running_it(tmp_path):
    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"model": RunsCode()}, tmp_path / "best.pt")
    with pytest.raises(YoloslimError) as error:
        load_classic_checkpoint(tmp_path / "best.pt")
    assert_one_line(error, f"{os.system.__module__}.system", "not loaded")
    assert not marker.exists()


def test_a_truncated_file_is_refused(tmp_path):
    data = (FIXTURES / "v7.0-best.pt").read_bytes()
    (tmp_path / "best.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(YoloslimError) as error:
        load_classic_checkpoint(tmp_path / "best.pt")
    assert_one_line(error, "damaged or truncated")


def save_as_the_original(path: Path, monkeypatch, build) -> None:
    """torch.save what build(original_model_class) returns, pickling that class as the original `models.yolo.Model`."""
    package, module = types.ModuleType("models"), types.ModuleType("models.yolo")
    module.Model = type("Model", (nn.Module,), {"__module__": "models.yolo"})
    package.yolo = module
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "models", package)
        patch.setitem(sys.modules, "models.yolo", module)
        torch.save(build(module.Model), path)


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (lambda model_class: [1, 2], "no 'model' entry"),
        (lambda model_class: {"model": nn.Sequential()}, "its model is a Sequential"),
        (lambda model_class: {"model": model_class()}, "do not end in a Detect head"),
    ],
)
def test_a_checkpoint_without_a_runnable_detection_model_is_refused(tmp_path, monkeypatch, build, problem):
    save_as_the_original(tmp_path / "best.pt", monkeypatch, build)
    with pytest.raises(YoloslimError) as error:
        load_classic_checkpoint(tmp_path / "best.pt")
    assert_one_line(error, problem, "original YOLOv5 repository")


def test_the_unpickler_refuses_other_codecs():
    payload = pickle.dumps(b"x", protocol=2).replace(b"latin1", b"rot_13")
    with pytest.raises(unpickle.NotAllowed, match="rot_13"):
        unpickle.Unpickler(io.BytesIO(payload)).load()


@pytest.mark.parametrize(
    ("name", "word"), [("v7.0-ghost", "models.common.GhostConv"), ("v7.0-segment", "segmentation checkpoint")]
)
def test_commands_refuse_them_in_one_line(tmp_path, name, word):
    weights = tmp_path / f"{name}.pt"
    weights.write_bytes((FIXTURES / f"{name}.pt").read_bytes())
    result = subprocess.run(
        [sys.executable, "-m", "yoloslim.cli", "prune", "--dry-run", "--weights", str(weights)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error and word in error, error
    assert list(tmp_path.iterdir()) == [weights]
