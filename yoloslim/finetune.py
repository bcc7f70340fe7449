"""Finetuning a pruned model without losing its pruned widths, optionally distilled from the unpruned model.

The trap: Ultralytics' trainer rebuilds every model from its yaml (which still describes the original widths) and
then loads only the tensors whose shapes match, so `YOLO("pruned.pt").train()` silently trains an unpruned,
mostly re-initialised network. FinetuneTrainer trains the pruned module itself, on a fresh run and on `resume=True`.

Distillation uses Ultralytics' own `distill_model` (its DistillationModel projects the student's features to the
teacher's widths, so a pruned student works as is).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from yoloslim.config import FINETUNE_RECIPE
from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.training import SafeDetectionTrainer, resume_run, trainable_copy


class FinetuneTrainer(SafeDetectionTrainer):
    """DetectionTrainer that trains the given (pruned) module instead of rebuilding it from its yaml."""

    def get_model(self, cfg=None, weights=None, verbose=True):
        if not isinstance(weights, nn.Module):
            raise YoloslimError(
                "finetuning starts from a checkpoint's model; pass --weights pruned.pt, not a model yaml"
            )
        return trainable_copy(weights, self.data["nc"])

    def checkpoint_extras(self) -> dict:
        return {**super().checkpoint_extras(), "finetune": {"teacher": self.args.distill_model}}


def finetune(
    weights: str | Path,
    data: str | Path | None = None,
    teacher: str | Path | None = None,
    resume: bool = False,
    **train_args,
):
    """Finetune a pruned checkpoint on `data` (default: the embedded dataset); return Ultralytics' metrics.
    `train_args` (Ultralytics train arguments) override FINETUNE_RECIPE's; imgsz defaults to the checkpoint's own."""
    from ultralytics import YOLO

    from yoloslim.data import resolve_data
    from yoloslim.utils.checks import load_detection_checkpoint

    dataset = str(resolve_data(data)) if data is not None or not resume else None  # checked before any work
    if resume:  # its model may be a DistillationModel around the student, which the check below refuses
        return resume_run(weights, FinetuneTrainer, dataset, refused={"teacher": teacher}, **train_args)
    load_detection_checkpoint(weights)
    if teacher is not None:
        load_detection_checkpoint(teacher)
        train_args["distill_model"] = str(teacher)
    train_args = {**FINETUNE_RECIPE.train_args(), **train_args}
    return YOLO(str(weights)).train(data=dataset, trainer=FinetuneTrainer, **train_args)
