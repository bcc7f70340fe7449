"""Finetuning a pruned model without losing its pruned widths, optionally distilled from the unpruned model, optionally
quantization-aware.

The trap: Ultralytics' trainer rebuilds every model from its yaml (which still describes the original widths) and
then loads only the tensors whose shapes match, so `YOLO("pruned.pt").train()` silently trains an unpruned,
mostly re-initialised network. FinetuneTrainer trains the pruned module itself, on a fresh run and on `resume=True`.

Distillation uses Ultralytics' own `distill_model` (its DistillationModel projects the student's features to the
teacher's widths, so a pruned student works as is).

Quantization-aware finetuning (QatTrainer) trains with INT8 fake quantization placed where the INT8 export of its
target puts Q/DQ (yoloslim.export.fakequant); the checkpoint keeps the fake quantization in its model, so a resumed run
(FinetuneTrainer, which trains the checkpoint's module as it is) continues it, and `yoloslim export --precision int8`
writes its trained ranges without calibration.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn
from ultralytics.utils import DEFAULT_CFG, LOGGER

from yoloslim.config import FINETUNE_RECIPE, REVIVE_GAMMA, QatConfig, changed_options
from yoloslim.models.train import ClassicTraining
from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.metadata import with_stage
from yoloslim.utils.training import SafeDetectionTrainer, resume_run, trainable_copy


def revive_dead_channels(model: nn.Module, gamma: float) -> int:
    """Give every BatchNorm channel whose gamma is exactly zero the gamma `gamma`; return how many there were.

    A zero-gamma channel outputs the constant act(beta). Where every channel a layer reads is such a constant, the
    layer's normalized output is zero, so its gamma gets no gradient, and its zero gamma passes none to the layers
    before it: training never leaves that point. Sparsity training zeroes whole layers so (a stage's whole stride-32
    path, backbone to head), and pruning keeps the rounding's minimum of their channels as constant carriers."""
    revived = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d) and module.weight is not None:
                dead = module.weight == 0
                module.weight[dead] = gamma
                revived += int(dead.sum())
    return revived


class FinetuneTrainer(SafeDetectionTrainer):
    """DetectionTrainer that trains the given (pruned) module instead of rebuilding it from its yaml; a fresh run first
    revives its zero-gamma channels (revive_dead_channels) unless `revive` is 0."""

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks=None, revive: float = REVIVE_GAMMA):
        super().__init__(cfg, overrides, _callbacks)
        self.revive = revive

    def get_model(self, cfg=None, weights=None, verbose=True):
        if not isinstance(weights, nn.Module):
            raise YoloslimError(
                "finetuning starts from a checkpoint's model; pass --weights pruned.pt, not a model yaml"
            )
        return self.revived(trainable_copy(weights, self.data["nc"]))

    def revived(self, model: nn.Module) -> nn.Module:
        """The model with its zero gammas revived on a fresh run; a resumed one continues its own."""
        if self.revive and not self.resume:
            revived = revive_dead_channels(model, self.revive)
            LOGGER.info(f"finetune: {revived} zero-gamma BatchNorm channels start at gamma {self.revive:g}")
        return model

    def checkpoint_extras(self) -> dict:
        return with_stage(super().checkpoint_extras(), "finetune", {"teacher": self.args.distill_model})

    def batchnorm_frozen(self) -> bool:
        """Whether BatchNorm statistics stay frozen: what a resumed quantization-aware run recorded."""
        return bool((self.lineage().get("qat") or {}).get("freeze_bn"))

    def _model_train(self):
        """Ultralytics puts the model in train mode every epoch; BatchNorm layers go back to eval mode when frozen,
        so they normalize with the running statistics the quantization ranges were calibrated with."""
        super()._model_train()
        if self.batchnorm_frozen():
            for module in self.model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()


class QatTrainer(FinetuneTrainer):
    """FinetuneTrainer whose model trains with INT8 fake quantization placed for `qat.target`, its ranges calibrated
    on the training images before the first step and held, at `qat.lr_scale` times the finetune's learning rate; the
    checkpoint records the flavour and placement."""

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks=None, qat: QatConfig | None = None):
        super().__init__(cfg, overrides, _callbacks, revive=0.0)  # its Q/DQ placement was read from the model as is
        self.qat, self.qat_record = qat or QatConfig(qat=True), None
        if "warmup_epochs" not in (overrides or {}):  # QAT refines a trained model: no ramp from a zero rate
            self.args.warmup_epochs = 0.0

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        """The finetune's optimizer (optimizer=auto picks it and its rate) at `qat.lr_scale` times its rate; the run's
        lr0 records the scaled rate, so a resumed run keeps it."""
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        for group in optimizer.param_groups:
            group["lr"] *= self.qat.lr_scale
        self.args.lr0 *= self.qat.lr_scale
        return optimizer

    def get_model(self, cfg=None, weights=None, verbose=True):
        from yoloslim.export.fakequant import prepare_qat

        model = super().get_model(cfg, weights, verbose)
        self.qat_record = prepare_qat(
            model, self.qat.target, self.args.data, self.args.imgsz, self.qat.calibration_images
        )
        return model

    def batchnorm_frozen(self) -> bool:
        return self.qat.freeze_bn

    def checkpoint_extras(self) -> dict:
        return {
            **super().checkpoint_extras(),
            "qat": {
                **self.qat_record,
                "calibration_images": self.qat.calibration_images,
                "freeze_bn": self.qat.freeze_bn,
            },
        }


class ClassicFinetuneTrainer(ClassicTraining, FinetuneTrainer):
    """FinetuneTrainer for a (pruned) model of the original YOLOv5 repository, its widths kept. Distillation is not
    available: Ultralytics' DistillationModel matches the features of its own heads."""

    def __init__(self, cfg=None, overrides: dict | None = None, _callbacks=None, **kwargs):
        if (overrides or {}).get("distill_model"):
            raise YoloslimError(
                "distillation takes Ultralytics' anchor-free heads, not the original YOLOv5 repository's anchor-based "
                "one; finetune without a teacher"
            )
        super().__init__(cfg, overrides, _callbacks, **kwargs)

    def get_model(self, cfg=None, weights=None, verbose=True):
        model = super().get_model(cfg, weights, verbose)
        return self.revived(model) if isinstance(weights, nn.Module) else model


def _check_options(qat: QatConfig | None, revive: float, resume: bool) -> None:
    """Refuse settings the run would ignore: quantization settings without qat, a revive gamma with qat or on
    resume."""
    if qat is not None and not qat.qat:
        unused = changed_options(QatConfig, qat)
        if unused:
            raise YoloslimError(f"{' and '.join(unused)} set quantization-aware finetuning; add --qat or drop them")
    if revive != REVIVE_GAMMA and ((qat is not None and qat.qat) or resume):
        when = "a resumed run keeps its own gammas" if resume else "qat places its Q/DQ on the model as it is"
        raise YoloslimError(f"--revive does not apply here: {when}; drop --revive")


def finetune(
    weights: str | Path,
    data: str | Path | None = None,
    teacher: str | Path | None = None,
    resume: bool = False,
    qat: QatConfig | None = None,
    revive: float = REVIVE_GAMMA,
    **train_args,
):
    """Finetune a pruned checkpoint on `data` (default: the embedded dataset); return Ultralytics' metrics.
    `train_args` (Ultralytics train arguments) override FINETUNE_RECIPE's; imgsz defaults to the checkpoint's own.
    `qat` with qat=True finetunes quantization-aware (QatConfig); otherwise a fresh run first gives every exactly-zero
    BatchNorm gamma the gamma `revive` (revive_dead_channels; 0 leaves them). A checkpoint of the original YOLOv5
    repository finetunes with the classic trainer (yoloslim.models.train), without a teacher, and the run's final files
    are in its format."""
    from ultralytics import YOLO

    from yoloslim.data import check_classes, resolve_data
    from yoloslim.models.train import is_classic_checkpoint, train_classic
    from yoloslim.utils.checks import load_detection_checkpoint

    aware = qat is not None and qat.qat
    _check_options(qat, revive, resume)
    dataset = str(resolve_data(data)) if data is not None or not resume else None  # checked before any work
    teacher = None if teacher is None else Path(teacher).resolve()  # a resumed run reads it from any folder
    if is_classic_checkpoint(weights):
        if aware:
            raise YoloslimError(
                "quantization-aware finetuning places its Q/DQ for Ultralytics' heads, not the original YOLOv5 "
                "repository's anchor-based one; finetune without qat, then export --precision int8"
            )
        teaching = {"distill_model": str(teacher)} if teacher is not None and not resume else {}
        refused = {"teacher": teacher}
        trainer = partial(ClassicFinetuneTrainer, revive=revive)
        return train_classic(
            trainer, "finetune", weights, dataset, resume, FINETUNE_RECIPE, refused, **teaching, **train_args
        )
    if resume:  # its model may be a DistillationModel around the student, which the check below refuses
        refused = {"teacher": teacher, "qat": "qat" if aware else None}
        return resume_run(weights, FinetuneTrainer, "finetune", dataset, refused=refused, **train_args)
    model, _ = load_detection_checkpoint(weights)
    check_classes(model, weights, Path(dataset))
    if teacher is not None:
        load_detection_checkpoint(teacher)
        train_args["distill_model"] = str(teacher)
    trainer = partial(FinetuneTrainer, revive=revive)
    if aware:
        from yoloslim.export.fakequant import qat_calibration_images

        qat_calibration_images(model, dataset, qat.calibration_images)  # before Ultralytics sets up a run
        trainer = partial(QatTrainer, qat=qat)
    train_args = {**FINETUNE_RECIPE.train_args(), **train_args}
    return YOLO(str(weights)).train(data=dataset, trainer=trainer, **train_args)
