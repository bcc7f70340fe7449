"""Training the original YOLOv5 repository's anchor-based models through Ultralytics' trainer
(yoloslim/models/train.py): the loss from an Ultralytics batch, the validator's layout, a few steps, sparsity, and
finetuning that keeps widths."""

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from yoloslim.models import DetectionModel, load_classic_checkpoint
from yoloslim.models.train import (
    ClassicFinetuneTrainer,
    ClassicSparsityTrainer,
    ClassicTrainer,
    ClassicTrainingModel,
    anchor_free_layout,
    as_training_model,
    plain_classic,
    read_classic_checkpoint,
)
from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.training import trainable_copy

FIXTURES = Path(__file__).parent / "fixtures" / "classic"
CHECKPOINT = FIXTURES / "v7.0-best.pt"  # written by the original's train.py: 3 classes, yolov5n.yaml at width 1/32
# no augmentation, so that the same images come back every epoch
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
    model, _ = read_classic_checkpoint(trainer.best)
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
        runs[name] = ClassicSparsityTrainer(overrides=dict(args, name=name), sparsity=SparsityConfig(sr=sr))
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
    config = SparsityConfig(sr=30.0, include_head=True, stop_at_flops=0.9, round_to=1)
    args = dict(classic_args, optimizer="SGD", lr0=0.01, epochs=6, val=False)
    trainer = ClassicSparsityTrainer(overrides=args, sparsity=config)
    trainer.train()
    with open(trainer.csv) as f:
        kept = [float(row["sparsity/zeroed_flops"]) for row in csv.DictReader(f)]
    assert len(kept) < 6 and kept[-1] <= 0.9 and all(k > 0.9 for k in kept[:-1])
    with plain_classic(trainer.ema.ema):
        assert kept[-1] == pytest.approx(zeroed_flops_fraction(trainer.ema.ema, config, 64), abs=1e-4)


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
