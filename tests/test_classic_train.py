"""Training the original YOLOv5 repository's anchor-based models through Ultralytics' trainer
(yoloslim/models/train.py): the loss from an Ultralytics batch, the validator's layout, a few steps, sparsity,
finetuning that keeps widths, and `yoloslim train` and `yoloslim finetune`, whose final files are in the original's
format."""

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from yoloslim.finetune import ClassicFinetuneTrainer
from yoloslim.models import DetectionModel, load_classic_checkpoint
from yoloslim.models.train import (
    ClassicTrainer,
    ClassicTrainingModel,
    anchor_free_layout,
    as_training_model,
    plain_classic,
    plain_values,
    read_classic_checkpoint,
    record_checkpoint,
)
from yoloslim.sparsity import ClassicSparsityTrainer
from yoloslim.utils.checks import load_detection_checkpoint, trained_imgsz
from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.metadata import checkpoint_metadata
from yoloslim.utils.training import trainable_copy

FIXTURES = Path(__file__).parent / "fixtures" / "classic"
CHECKPOINT = FIXTURES / "v7.0-best.pt"  # written by the original's train.py: 3 classes, yolov5n.yaml at width 1/32
# no augmentation, so that the same images come back every epoch
# What a run writes over its input's opt: the original train.py's names for this run's settings.
RUN_OPTIONS = {"weights", "cfg", "data", "epochs", "batch_size", "imgsz", "optimizer", "cos_lr", "seed", "workers"}
STILL = dict(mosaic=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, fliplr=0.0, scale=0.0, translate=0.0)


@pytest.fixture(scope="module")
def classic_data(tmp_path_factory) -> Path:
    """The generated dataset with the fixture checkpoint's three classes, as the original trained it on."""
    from yoloslim.data.synthetic import default_config, ensure_synthetic_dataset

    config = dataclasses.replace(
        default_config(),
        image_size=96,
        splits={"train": 8, "val": 4},
        object_size=(8, 48),
        classes=("circle", "square", "triangle"),
    )
    return ensure_synthetic_dataset(config, root=tmp_path_factory.mktemp("classic-data"))


@pytest.fixture
def classic_args(train_args, classic_data) -> dict:
    return dict(train_args, model=str(CHECKPOINT), data=str(classic_data))


def conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def training_model(imgsz: int = 64) -> ClassicTrainingModel:
    model = as_training_model(trainable_copy(load_classic_checkpoint(CHECKPOINT)[0], nc=3))
    model.args = type("Args", (), {"imgsz": imgsz})
    return model


def test_eval_output_is_in_the_validators_layout_with_the_originals_confidence():
    model = training_model().eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        boxes, raw = DetectionModel.forward(model, images)  # the classic output
        layout, raw_again = model(images)
    assert layout.shape == (2, 4 + 3, boxes.shape[1])
    torch.testing.assert_close(layout[:, :4], boxes[..., :4].transpose(1, 2))
    torch.testing.assert_close(layout[:, 4:], (boxes[..., 4:5] * boxes[..., 5:]).transpose(1, 2))
    assert all(torch.equal(a, b) for a, b in zip(raw, raw_again))
    assert torch.equal(anchor_free_layout(boxes), layout)


def test_loss_of_an_ultralytics_batch_equals_the_originals():
    """The labels of the loss fixture as Ultralytics batches them give the original's loss."""
    with np.load(FIXTURES / "loss-edges.npz") as loaded:
        expected = {key: torch.from_numpy(value) for key, value in loaded.items()}
    targets = expected["targets"]
    batch = {"batch_idx": targets[:, 0], "cls": targets[:, 1:2], "bboxes": targets[:, 2:], "img": None}
    raw = [expected[f"raw{i}"] for i in range(3)]
    loss, parts = training_model(imgsz=int(expected["imgsz"])).loss(batch, preds=raw)
    assert list(parts) == ["box_loss", "obj_loss", "cls_loss"]
    torch.testing.assert_close(torch.stack(list(parts.values())), expected["parts"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(loss.view(1), expected["loss"], rtol=1e-5, atol=1e-8)


def test_training_model_is_saved_and_traced_as_the_plain_classic_model():
    model = training_model()
    with plain_classic(model):
        assert type(model) is DetectionModel
    assert type(model) is ClassicTrainingModel


def test_a_dataset_of_other_classes_is_refused_by_the_heads_class_count():
    model = load_classic_checkpoint(FIXTURES / "v6.0-best.pt")[0]  # v6.0's model has no nc of its own
    with pytest.raises(YoloslimError, match="trained for 3") as refused:
        trainable_copy(model, nc=8)
    assert len(str(refused.value).splitlines()) == 1


def test_final_files_take_this_runs_options_and_date_over_the_inputs():
    record = {"checkpoint": {"opt": {"imgsz": 64, "epochs": 1, "hyp": "h.yaml"}, "date": "2022-01-01", "git": None}}
    entries = record_checkpoint(record, {"imgsz": 320, "epochs": 30})
    assert entries["opt"] == {"imgsz": 320, "epochs": 30, "hyp": "h.yaml"} and entries["date"] > "2026"
    assert entries["git"] is None
    older = record_checkpoint({"checkpoint": {"epoch": 3}}, {"imgsz": 320})  # v6.0 and older: no opt, no date
    assert older == {"epoch": 3, "opt": {"imgsz": 320}}


def test_distillation_is_refused_in_one_line(classic_args):
    with pytest.raises(YoloslimError, match="anchor-based") as error:
        ClassicFinetuneTrainer(overrides=dict(classic_args, distill_model=str(CHECKPOINT)))
    assert len(str(error.value).splitlines()) == 1


@pytest.mark.slow
def test_a_few_training_steps_reduce_the_loss(classic_args):
    # the original's small gains move a model this size slowly under SGD; Adam shows the descent within a few steps
    args = dict(classic_args, **STILL, batch=2, nbs=2, epochs=8, optimizer="AdamW", lr0=0.02, val=False)
    trainer = ClassicTrainer(overrides=args)
    trainer.train()
    batch = trainer.preprocess_batch(next(iter(trainer.train_loader)))
    start = training_model()
    with torch.no_grad():
        before = start.eval().loss(batch)[0]
        after = trainer.model.eval().loss(batch)[0]
    assert after < 0.97 * before, (before, after)
    for path in (trainer.last, trainer.best):  # what was saved is the plain classic model, read back as such
        model, ckpt = read_classic_checkpoint(path)
        assert type(model) is DetectionModel and ckpt["epoch"] == -1


@pytest.mark.slow
def test_a_new_model_is_built_from_a_classic_yaml_with_the_datasets_classes(classic_args, tmp_path):
    import yaml

    spec = dict(load_classic_checkpoint(CHECKPOINT)[0].yaml, nc=80)
    cfg = tmp_path / "classic.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    trainer = ClassicTrainer(overrides=dict(classic_args, model=str(cfg), epochs=1, val=False))
    trainer.train()
    model, ckpt = read_classic_checkpoint(trainer.best)
    assert trained_imgsz(ckpt) == trainer.args.imgsz  # the size the commands then default to
    assert model.model[-1].nc == 3 and model.model[-1].no * 3 == model.model[-1].m[0].out_channels
    assert conv_widths(model)[:-3] == conv_widths(DetectionModel(spec))[:-3]  # the yaml's layout, 3 classes


def gammas(model: nn.Module) -> np.ndarray:
    return torch.cat([m.weight.detach().abs() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]).numpy()


def require_classic_tracing() -> None:
    from yoloslim.sparsity import prunable_batchnorms

    try:
        prunable_batchnorms(load_classic_checkpoint(CHECKPOINT)[0])
    except (TypeError, YoloslimError) as e:
        pytest.skip(f"yoloslim.graph does not trace the original repository's models yet ({e})")


@pytest.mark.slow
def test_sparsity_drives_gamma_towards_zero(classic_args):
    from yoloslim.sparsity import SparsityConfig

    require_classic_tracing()
    args = dict(classic_args, optimizer="SGD", lr0=0.01, epochs=3, val=False)
    runs = {}
    for name, sr in (("plain", 0.0), ("sparse", 3.0)):
        runs[name] = ClassicSparsityTrainer(
            overrides=dict(args, name=name), sparsity=SparsityConfig(targeted=False, sr=sr)
        )
        runs[name].train()
    assert runs["sparse"]._penalised_names  # the classic model's BatchNorms were found and penalised
    for attr in ("model", "ema"):
        plain, sparse = (getattr(runs[n], attr) for n in ("plain", "sparse"))
        plain, sparse = (m.ema if attr == "ema" else m for m in (plain, sparse))
        assert np.median(gammas(sparse)) < np.median(gammas(plain)) - 0.05, attr


@pytest.mark.slow
def test_run_ends_once_the_zeroed_channels_give_the_target_prune(classic_args):
    """stop_at_flops measures a prune of the training model, traced as the plain classic model."""
    from yoloslim.sparsity import SparsityConfig, zeroed_flops_fraction

    require_classic_tracing()
    config = SparsityConfig(targeted=False, sr=30.0, include_head=True, stop_at_flops=0.9, round_to=1)
    args = dict(classic_args, optimizer="SGD", lr0=0.01, epochs=6, val=False)
    trainer = ClassicSparsityTrainer(overrides=args, sparsity=config)
    trainer.train()
    with open(trainer.csv) as f:
        kept = [float(row["sparsity/zeroed_flops"]) for row in csv.DictReader(f)]
    assert len(kept) < 6 and kept[-1] <= 0.9 and all(k > 0.9 for k in kept[:-1])
    with plain_classic(trainer.ema.ema):
        assert kept[-1] == pytest.approx(zeroed_flops_fraction(trainer.ema.ema, config, 64), abs=1e-4)


def test_targeted_sparsity_chooses_the_prunes_removals_on_the_plain_classic_model(classic_args):
    from yoloslim.prune import PruneConfig, planned_removals
    from yoloslim.sparsity import SparsityConfig

    require_classic_tracing()
    config = SparsityConfig(targeted=True, stop_at_flops=0.9, round_to=1)
    trainer = ClassicSparsityTrainer(overrides=dict(classic_args, optimizer="SGD"), sparsity=config)
    trainer._setup_train()
    trainer.select_targets()
    assert type(trainer.model) is ClassicTrainingModel  # the plain model only while planning
    with plain_classic(trainer.model):
        plan = planned_removals(trainer.model, PruneConfig(target_flops=0.9, round_to=1, imgsz=trainer.args.imgsz))
    chosen = {name: t.tolist() for name, t in trainer._targets.items()}
    assert chosen and chosen == {n: i for n, i in plan.items() if n in trainer._penalised_names}


class Interrupt(Exception):
    pass


def stop_after_first_save(trainer):
    raise Interrupt


@pytest.mark.slow
def test_finetuning_keeps_widths_also_after_resume(classic_args, tmp_path):
    """A model narrower than its yaml (as a pruned one is) trains at its own widths, on a new run and on resume."""
    model, _ = load_classic_checkpoint(CHECKPOINT)
    model.yaml = dict(model.yaml, width_multiple=0.0625)  # a rebuild from the yaml would double every width
    widths = conv_widths(model)
    assert conv_widths(DetectionModel(model.yaml)) != widths
    narrow = tmp_path / "narrow.pt"
    torch.save({"model": model.half(), "epoch": -1}, narrow)

    trainer = ClassicFinetuneTrainer(overrides=dict(classic_args, model=str(narrow), epochs=2))
    trainer.add_callback("on_model_save", stop_after_first_save)
    with pytest.raises(Interrupt):
        trainer.train()
    assert conv_widths(read_classic_checkpoint(trainer.last)[0]) == widths

    resumed = ClassicFinetuneTrainer(overrides={"model": str(trainer.last), "resume": str(trainer.last)})
    resumed.train()
    assert resumed.start_epoch == 1
    for path in (resumed.last, resumed.best):
        model, ckpt = read_classic_checkpoint(path)
        assert conv_widths(model) == widths and ckpt["epoch"] == -1
    with open(resumed.csv) as f:  # validated every epoch, with the classic loss on the val images
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(row["val/box_loss"]) > 0 and float(row["val/obj_loss"]) > 0 for row in rows)


# -- the commands: `yoloslim train` and `yoloslim finetune` on the original repository's checkpoints ----------------


def pickled_globals(path: Path) -> set[str]:
    """Every global the checkpoint's pickle names, read with pickletools (nothing is unpickled)."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def assert_original_format(path: Path, source: Path, trained: bool = True) -> tuple[nn.Module, dict]:
    """`path` pickles its model under the original repository's paths, as `source` did, with `source`'s keys, FP16,
    its training state cleared, and (`trained` from `source`) the training's opt and date, else `source`'s; returns
    what yoloslim's classic loader reads."""
    found = pickled_globals(path)
    assert not {g for g in found if g.startswith(("yoloslim.", "ultralytics."))}, found
    assert {g for g in found if g.startswith("models.yolo.")} == {
        g for g in pickled_globals(source) if g.startswith("models.yolo.")
    }
    assert "torch.HalfStorage" in found  # the weights in FP16, as train.py saves them
    model, ckpt = load_classic_checkpoint(path)
    _, given = load_classic_checkpoint(source)
    assert set(ckpt) == set(given) | ({"opt"} if trained else set())  # added where a release kept it in opt.yaml
    assert ckpt["epoch"] == -1 and ckpt["optimizer"] is None and ckpt["ema"] is None
    assert ckpt["model"] is model
    for key in set(given) - {"model", "epoch", "optimizer", "best_fitness", "ema", "updates", "opt", "date"}:  # git
        assert plain_values(ckpt[key]) == plain_values(given[key]), key
    opt, given_opt = plain_values(ckpt.get("opt") or {}), plain_values(given.get("opt") or {})  # paths as strings
    assert {k: v for k, v in opt.items() if k not in RUN_OPTIONS} == {
        k: v for k, v in given_opt.items() if k not in RUN_OPTIONS
    }
    if not trained:  # a prune keeps the input's entries as they are
        assert plain_values(ckpt.get("opt")) == plain_values(given.get("opt")) and ckpt.get("date") == given.get("date")
    assert "date" not in given or not trained or ckpt["date"] > given["date"]  # dated by its run, where the input was
    return model, ckpt


@pytest.mark.slow
def test_train_command_writes_the_originals_format_with_the_sparsity_record(cli, classic_data, tmp_path):
    """One epoch of `yoloslim train` on the original's checkpoint, at its training size (64): best.pt and last.pt in
    the original's format, with the sparsity settings and gamma history on the model."""
    import yaml

    code, err, _ = cli(
        "train", "--weights", CHECKPOINT, "--data", classic_data, "--epochs", 1, "--batch", 4, "--sr", 0.5,
        "--stop-at-flops", 0.95, "--project", tmp_path, "--name", "run", "workers=0", "plots=False", "warmup_epochs=0",
    )  # fmt: skip
    assert code == 0, err
    run = tmp_path / "run"
    assert yaml.safe_load((run / "args.yaml").read_text())["imgsz"] == 64
    for name in ("best.pt", "last.pt"):
        model, ckpt = assert_original_format(run / "weights" / name, CHECKPOINT)
        metadata = checkpoint_metadata(ckpt)
        assert metadata["sparsity"]["sr"] == 0.5 and len(metadata["gamma_history"]["epochs"]) == 1
        assert "original_format" not in metadata  # the record a resume needs stays in the trainer's files
        assert conv_widths(model) == conv_widths(load_classic_checkpoint(CHECKPOINT)[0])


@pytest.fixture(scope="module")
def pruned_v6(tmp_path_factory) -> Path:
    """v6.0-best.pt (models.yolo.Model) pruned by yoloslim, in the original's format."""
    from yoloslim.prune import PruneConfig, prune

    out = tmp_path_factory.mktemp("pruned") / "pruned.pt"
    return prune(FIXTURES / "v6.0-best.pt", PruneConfig(ratio=0.5, round_to=1, imgsz=64), out=out).out


@pytest.mark.slow
def test_finetune_command_keeps_widths_and_the_originals_format_also_after_resume(
    cli, classic_args, pruned_v6, tmp_path
):
    """A run of a pruned original-format checkpoint, interrupted after its first save, resumed by `yoloslim finetune
    --resume`: the pruned widths throughout, and the final files in the input's format (models.yolo.Model)."""
    widths = conv_widths(load_classic_checkpoint(pruned_v6)[0])
    assert widths != conv_widths(DetectionModel(load_classic_checkpoint(pruned_v6)[0].yaml))
    trainer = ClassicFinetuneTrainer(overrides=dict(classic_args, model=str(pruned_v6), epochs=2))
    trainer.add_callback("on_model_save", stop_after_first_save)
    with pytest.raises(Interrupt):
        trainer.train()
    assert conv_widths(read_classic_checkpoint(trainer.last)[0]) == widths
    model, _ = load_detection_checkpoint(trainer.last, classic=True)  # an unfinished run's file, for every command
    assert type(model) is DetectionModel and not model.training and conv_widths(model) == widths
    with pytest.raises(YoloslimError, match="anchor-based") as refused:
        load_detection_checkpoint(trainer.last)
    assert len(str(refused.value).splitlines()) == 1

    code, err, _ = cli("finetune", "--weights", trainer.last, "--resume")
    assert code == 0, err
    for path in (trainer.last, trainer.best):
        model, ckpt = assert_original_format(path, pruned_v6)
        assert conv_widths(model) == widths
        assert checkpoint_metadata(ckpt)["prune"] == checkpoint_metadata(load_classic_checkpoint(pruned_v6)[1])["prune"]
    code, err, _ = cli("finetune", "--weights", trainer.last, "--resume")  # the original-format last.pt: finished
    assert code == 2 and "finished run" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_finetune_command_runs_a_pruned_original_checkpoint(cli, classic_data, pruned_v6, tmp_path):
    """At another size than the input's (64): every file written, the epoch snapshot included, in the original's
    format with this run's size, which the next command defaults to."""
    code, err, _ = cli(
        "finetune", "--weights", pruned_v6, "--data", classic_data, "--epochs", 1, "--batch", 4, "--imgsz", 96,
        "--project", tmp_path, "--name", "run", "workers=0", "plots=False", "warmup_epochs=0", "save_period=1",
    )  # fmt: skip
    assert code == 0, err
    weights = tmp_path / "run" / "weights"
    snapshots = sorted(weights.glob("epoch*.pt"))
    assert snapshots
    for path in (weights / "best.pt", *snapshots):
        model, ckpt = assert_original_format(path, pruned_v6)
        assert conv_widths(model) == conv_widths(load_classic_checkpoint(pruned_v6)[0])
        assert trained_imgsz(ckpt) == 96 and ckpt["opt"]["epochs"] == 1


def test_finetune_command_refuses_distillation_and_qat_in_one_line(cli, classic_data):
    for extra in (("--teacher", CHECKPOINT), ("--qat",)):
        code, err, _ = cli("finetune", "--weights", CHECKPOINT, "--data", classic_data, *extra)
        assert code == 2 and "anchor-based" in err and len(err.splitlines()) == 1, err


def test_resuming_an_unfinished_run_of_the_originals_train_py_is_refused(cli):
    code, err, _ = cli("train", "--weights", FIXTURES / "v6.2-last.pt", "--resume")
    assert code == 2 and "original YOLOv5 repository's train.py" in err and len(err.splitlines()) == 1, err
