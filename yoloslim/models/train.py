"""Training the original YOLOv5 repository's anchor-based models with Ultralytics' trainer, so that sparsity training,
finetuning, schedules, resume, atomic checkpoints and monitoring work for them as for the YOLOv5u path.

What the trainer expects of its model, and how a classic model meets it:
- called with a batch dict, it returns the loss: ClassicTrainingModel computes yoloslim's classic loss
  (yoloslim/models/loss.py) with the original's gains, scaled for the run's classes, levels and image size;
- in eval mode its output suits Ultralytics' DetectionValidator, which expects the anchor-free layout (batch, 4 +
  classes, boxes): the classic boxes are passed on with objectness x class score as each class's confidence, which
  is the original's confidence, and the raw maps ride along for the validation loss;
- it is built by get_model from the checkpoint's module (its widths kept: a pruned model trains as it is) or, for a
  new model, from a classic model yaml.

The sparsity and finetuning stages build their classic trainers from ClassicTraining and their own trainer
(yoloslim.sparsity.ClassicSparsityTrainer, yoloslim.finetune.ClassicFinetuneTrainer); this module imports neither.

ClassicTrainingModel exists only while training: what is saved, and what yoloslim.graph traces (the sparsity
penalty's BatchNorms), is the plain classic DetectionModel (plain_classic), so checkpoints hold the same classes as a
model read from the original's files.
"""

from __future__ import annotations

from argparse import Namespace
from contextlib import contextmanager
from copy import copy
from datetime import datetime
from pathlib import Path, PurePath

import numpy as np
import torch
from torch import nn
from ultralytics.models.yolo.detect import DetectionValidator
from ultralytics.utils import DEFAULT_CFG
from ultralytics.utils.patches import torch_load

from yoloslim.models.loss import ClassicLoss, LossGains
from yoloslim.models.save import TRAINING_STATE, original_names, save_original_format
from yoloslim.models.yolo import DetectionModel
from yoloslim.utils.checks import in_original_format, pickled_modules, trained_imgsz
from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.metadata import checkpoint_metadata
from yoloslim.utils.training import SafeDetectionTrainer, trainable_copy

LOSS_NAMES = ("box_loss", "obj_loss", "cls_loss")
# the keys of a checkpoint v7.0's train.py writes, which the final files of a run from a yaml take
V7_CHECKPOINT_KEYS = ("epoch", "best_fitness", "model", "ema", "updates", "optimizer", "opt", "git", "date")
ORIGINAL_FORMAT = "original_format"  # yoloslim's metadata key for the input's format, which the final files take
TRAINER_ATTRIBUTES = ("args", "criterion")  # set on the model while training, of classes the original's code lacks


class ClassicTrainingModel(DetectionModel):
    """A classic DetectionModel as Ultralytics' trainer and validator call it (see the module docstring)."""

    criterion = None

    def forward(self, x, augment: bool = False):
        if isinstance(x, dict):
            return self.loss(x)
        if augment:
            raise YoloslimError("test-time augmentation is not implemented for anchor-based models; set augment=False")
        out = super().forward(x)
        if self.training:
            return out
        boxes, raw = out
        return anchor_free_layout(boxes), raw

    def loss(self, batch: dict, preds=None):
        """(loss to minimise, {name: detached part}) for an Ultralytics batch; preds: this model's output for it."""
        if self.criterion is None:
            self.criterion = self.init_criterion()
        if preds is None:
            preds = self.forward(batch["img"])
        raw = preds[1] if isinstance(preds, tuple) else preds
        loss, parts = self.criterion(raw, ultralytics_targets(batch))
        return loss, dict(zip(LOSS_NAMES, parts))

    def init_criterion(self) -> ClassicLoss:
        head = self.model[-1]
        return ClassicLoss(head, LossGains().scaled(nc=head.nc, nl=head.nl, imgsz=self.args.imgsz))

    def set_head_attr(self, **attributes) -> None:
        """Ultralytics sets its own head's settings (max_det) through this; those the classic head lacks are no
        concern of it (the classic head keeps every box until NMS)."""
        head = self.model[-1]
        for name, value in attributes.items():
            if hasattr(head, name):
                setattr(head, name, value)


def anchor_free_layout(boxes: torch.Tensor) -> torch.Tensor:
    """Classic eval boxes (batch, anchors, 5 + classes) as Ultralytics' (batch, 4 + classes, anchors): box in input
    pixels (centre x, centre y, width, height), then objectness x class score per class."""
    return torch.cat((boxes[..., :4], boxes[..., 4:5] * boxes[..., 5:]), 2).transpose(1, 2)


def ultralytics_targets(batch: dict) -> torch.Tensor:
    """An Ultralytics batch's labels as the classic loss takes them: (n, 6) rows of image, class, x, y, w, h."""
    return torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1), batch["bboxes"]), 1)


def as_training_model(model: DetectionModel) -> ClassicTrainingModel:
    """The same module (no copy), trainable by Ultralytics."""
    model.__class__ = ClassicTrainingModel
    return model


@contextmanager
def plain_classic(model: nn.Module):
    """Within the block, a ClassicTrainingModel is a plain DetectionModel: what is pickled into checkpoints and what
    yoloslim.graph traces and recognises."""
    swapped = type(model) is ClassicTrainingModel
    if swapped:
        model.__class__ = DetectionModel
    try:
        yield model
    finally:
        if swapped:
            model.__class__ = ClassicTrainingModel


class ClassicTraining:
    """What makes a yoloslim trainer (a SafeDetectionTrainer subclass) train classic models; list it first among the
    bases."""

    def __init__(self, cfg=None, overrides: dict | None = None, _callbacks=None, **kwargs):
        # channels_last would convert every tensor the model holds, and the head's cached grids from the original's
        # checkpoints are 5-D, which that memory format refuses
        super().__init__(cfg or DEFAULT_CFG, {**(overrides or {}), "channels_last": False}, _callbacks, **kwargs)

    def setup_model(self):
        """The model from --model: a classic checkpoint (the original's format, or one a classic run wrote) or a classic
        model yaml. Returns the checkpoint, which a resumed run continues."""
        if isinstance(self.model, nn.Module):
            return None
        source = str(self.model)
        if not source.endswith(".pt"):
            self.model = self.get_model(cfg=source)
            return None
        weights, ckpt = read_classic_checkpoint(source)
        if in_original_format(source) and not self.resume:
            self._original_format = original_format_record(Path(source), ckpt)
        self.model = self.get_model(cfg=weights.yaml, weights=weights)
        return ckpt

    def get_model(self, cfg=None, weights=None, verbose=True):
        if isinstance(weights, nn.Module):
            if not isinstance(weights, DetectionModel):
                raise YoloslimError(
                    f"the classic trainer takes the original YOLOv5 repository's models, not a {type(weights).__name__}"
                )
            return as_training_model(trainable_copy(weights, self.data["nc"]))
        return as_training_model(DetectionModel(cfg, ch=self.data["channels"], nc=self.data["nc"]))

    def lineage(self) -> dict:
        source = self.args.resume if self.resume else self.args.model
        if not hasattr(self, "_lineage") and in_original_format(source):  # which Ultralytics' loader cannot read
            from yoloslim.models import load_classic_checkpoint

            self._lineage = checkpoint_metadata(load_classic_checkpoint(source)[1])
        return super().lineage()

    def checkpoint_extras(self) -> dict:
        """yoloslim's metadata, with the input's original format, which the run's final files take (on resume, from
        last.pt's metadata)."""
        record = getattr(self, "_original_format", None) or self.lineage().get(ORIGINAL_FORMAT)
        return {**super().checkpoint_extras(), **({ORIGINAL_FORMAT: record} if record else {})}

    def finish_checkpoints(self) -> None:
        """Rewrite the run's checkpoints once each, in the original repository's format (the input's class paths and
        keys, FP16, training state cleared), so that its own tools load them; until then they are in the trainer's
        format, which a resumed run reads. last.pt goes last: a run stopped before it can still be resumed."""
        for path in (*sorted(self.wdir.glob("epoch*.pt")), self.best, self.last):
            if path.exists() and not in_original_format(path):
                ckpt = torch_load(path, map_location="cpu")
                metadata = checkpoint_metadata(ckpt)
                model = original_model(ckpt.get("ema") or ckpt["model"])
                record = metadata.pop(ORIGINAL_FORMAT, None) or {}
                entries = record_checkpoint(record, self.original_options())
                save_original_format(model, entries, path, record_names(record), metadata)

    def original_options(self) -> dict:
        """This run's settings under the names of the original train.py's options, for the `opt` of a run without an
        input in the original's format (a new model from a yaml), which the original's tools and yoloslim read (its
        imgsz is the size the commands default to)."""
        a = self.args
        source = {"weights": a.model} if str(a.model).endswith(".pt") else {"cfg": a.model}
        options = dict(source, data=a.data, epochs=a.epochs, batch_size=a.batch, imgsz=a.imgsz)
        return plain_values(dict(options, optimizer=a.optimizer, cos_lr=a.cos_lr, seed=a.seed, workers=a.workers))

    def build_optimizer(self, model, *args, **kwargs):
        with plain_classic(model):  # SparsityTrainer's penalty finds its BatchNorms through yoloslim.graph
            return super().build_optimizer(model, *args, **kwargs)

    def save_model(self):
        with plain_classic(self.ema.ema):
            return super().save_model()

    def get_validator(self):
        args = copy(self.args)
        return ClassicValidator(self.test_loader, save_dir=self.save_dir, args=args, _callbacks=self.callbacks)


class ClassicValidator(DetectionValidator):
    """Ultralytics' DetectionValidator for classic models: a checkpoint given by path (the final validation of best.pt)
    runs as a ClassicTrainingModel, whose output is in the layout the validator reads."""

    def __call__(self, trainer=None, model=None):
        if trainer is None and isinstance(model, (str, Path)):
            model = as_training_model(read_classic_checkpoint(model)[0])
        return super().__call__(trainer=trainer, model=model)


def read_classic_checkpoint(path: str | Path) -> tuple[DetectionModel, dict]:
    """(model, checkpoint) of a classic checkpoint: the original's format through yoloslim's allow-list, or one that a
    classic run of this module wrote (yoloslim's classes beside Ultralytics' entries), through Ultralytics."""
    from ultralytics.nn.tasks import load_checkpoint

    from yoloslim.models import load_classic_checkpoint

    if in_original_format(path):
        return load_classic_checkpoint(path)
    model, ckpt = load_checkpoint(path)
    if not isinstance(model, DetectionModel):
        raise YoloslimError(
            f"{path} holds a {type(model).__module__}.{type(model).__name__}, not an anchor-based model of the "
            "original YOLOv5 repository; pass such a checkpoint"
        )
    return model, ckpt


def train_classic(
    trainer,
    stage: str,
    weights: str | Path,
    data: str | None,
    resume: bool,
    recipe,
    refused: dict | None = None,
    **train_args,
):
    """The classic branch of yoloslim.sparsity.train_sparse and yoloslim.finetune.finetune (Ultralytics' YOLO() cannot
    read these checkpoints): run `trainer` (a ClassicTraining trainer or factory for the training `stage`, a
    yoloslim.utils.training.TRAINING_STAGES key) from `weights` with `recipe`'s
    arguments under `train_args`, imgsz defaulting to the checkpoint's own, or resume the run of `weights` (its
    last.pt); `data` was checked by resolve_data. Returns the final validation's metrics."""
    from yoloslim.utils.training import check_resumable

    if resume:
        check_resumable(weights, stage, **(refused or {}))
        if in_original_format(weights):
            raise YoloslimError(
                f"{weights} is an unfinished run of the original YOLOv5 repository's train.py, which yoloslim does not "
                "resume; resume it with that train.py, or train from it without resuming"
            )
        overrides = {**train_args, "model": str(weights), "resume": str(weights), **({"data": data} if data else {})}
    else:
        _, ckpt = read_classic_checkpoint(weights)
        imgsz = trained_imgsz(ckpt)
        defaults = {**recipe.train_args(), **({"imgsz": imgsz} if imgsz else {})}
        overrides = {**defaults, **train_args, "model": str(weights), "data": data}
    run = trainer(overrides=overrides)
    run.train()
    return getattr(run.validator, "metrics", None)


def is_classic_checkpoint(path: str | Path) -> bool:
    """Whether a .pt file holds an anchor-based model: in the original repository's format, or a classic run's."""
    return in_original_format(path) or (
        str(path).endswith(".pt") and DetectionModel.__module__ in pickled_modules(Path(path))
    )


def original_format_record(source: Path, ckpt: dict) -> dict:
    """What a run's final files take from its input in the original format, as plain values for yoloslim's metadata:
    the path each class was pickled under, and the checkpoint's entries (those of the model and its training state
    as None: the final files hold the trained model and clear the state)."""
    names = {cls.__name__: path for cls, path in original_names(source).items()}
    cleared = ("model", *TRAINING_STATE)
    kept = {key: None if key in cleared else plain_values(value) for key, value in ckpt.items()}
    return {"classes": names, "checkpoint": kept}


def record_names(record: dict) -> dict[type, str]:
    """original_names() of a run's input, from its original_format_record (v7.0's paths for a run without one)."""
    names = original_names()
    paths = record.get("classes", {})
    return {cls: paths.get(cls.__name__, path) for cls, path in names.items()}


def record_checkpoint(record: dict, options: dict) -> dict:
    """The entries of a run's final files: its input's, from its original_format_record, or for a run without one
    those of v7.0's train.py; with this run's `options` over its opt (added where a release before v6.1 kept it in
    opt.yaml: the commands read the size a model was trained at from it) and dated now where the input was dated, as
    the original's train.py dates its files."""
    entries = record.get("checkpoint") or dict.fromkeys(V7_CHECKPOINT_KEYS)
    opt = entries.get("opt")
    dated = {"date": datetime.now().isoformat()} if "date" in entries else {}
    return {**entries, "opt": {**opt, **options} if isinstance(opt, dict) else options, **dated}


def plain_values(value):
    """`value` with paths as strings, namespaces and numpy values as Python's own: what yoloslim's metadata holds."""
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {key: plain_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_values(item) for item in value]
    if isinstance(value, PurePath):
        return str(value)
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


def original_model(model: DetectionModel) -> DetectionModel:
    """The classic model of a checkpoint the trainer wrote, without what the trainer set on it (its arguments, its
    loss), whose classes the original's code does not have."""
    for name in TRAINER_ATTRIBUTES:
        model.__dict__.pop(name, None)
    return model


class ClassicTrainer(ClassicTraining, SafeDetectionTrainer):
    """Plain training of a classic model."""
