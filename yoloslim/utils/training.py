"""What every yoloslim trainer adds to Ultralytics' DetectionTrainer: checkpoints that a kill cannot tear, a resume
that does not log an epoch twice, a place in the checkpoint for yoloslim's own settings, and a bias warm-up fit for
Adam.

Ultralytics writes last.pt and best.pt in place (in save_model, and again when final_eval strips the optimizer), so a
kill during a write leaves a truncated file that `resume` cannot read. Here each write goes to a staging file that is
renamed into place, and a `save_period` snapshot (epochN.pt) is replaced by a copy of the finished last.pt. yoloslim's
settings ride on the checkpoint's model as its `yoloslim` attribute (a dict of plain values), so that each file is
written once, by Ultralytics' own save, and travels with the model from stage to stage; they cannot live in the train
arguments, which Ultralytics' final strip filters.
"""

from __future__ import annotations

import os
import pickle
import shutil
from copy import deepcopy
from pathlib import Path

from torch import nn
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, LOCAL_RANK, LOGGER, RANK
from ultralytics.utils.patches import torch_load
from ultralytics.utils.torch_utils import strip_optimizer, torch_distributed_zero_first

from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.files import atomic_path, write_text_atomic
from yoloslim.utils.metadata import checkpoint_metadata, set_checkpoint_metadata

# The optimizers whose biases warm up from zero unless the user says otherwise: Ultralytics' own optimizer=auto does
# that when it picks AdamW, an explicit optimizer=AdamW does not.
ADAM_FAMILY = frozenset({"adam", "adamax", "adamw", "nadam", "radam"})
# Ultralytics' build_optimizer knows these (any case) and raises from inside its trainer, after it made the run's
# folder, for any other; its list is local to that method, so a test keeps this copy equal to it.
ULTRALYTICS_OPTIMIZERS = ("Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSprop", "SGD", "MuSGD", "auto")


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint file's dict, Ultralytics' or in the original YOLOv5 repository's format (which a classic run
    writes at its end, and which Ultralytics' loader cannot read)."""
    from yoloslim.utils.checks import in_original_format

    if in_original_format(path):
        from yoloslim.models import load_classic_checkpoint

        return load_classic_checkpoint(path)[1]
    ckpt = torch_load(path, map_location="cpu")
    if not isinstance(ckpt, dict):
        raise YoloslimError(f"{path} holds a {type(ckpt).__name__}, not a training checkpoint; pass a run's last.pt")
    return ckpt


def read_checkpoint_extras(path) -> dict:
    """The yoloslim metadata of a checkpoint file (empty for a plain Ultralytics one)."""
    return checkpoint_metadata(read_checkpoint(path))


def run_finished(last: str | Path) -> bool:
    """Whether a run's last.pt is final: Ultralytics strips the optimizer and sets epoch -1 when a run ends."""
    return checkpoint_finished(read_checkpoint(last))


def checkpoint_finished(ckpt: dict) -> bool:
    return ckpt.get("epoch", -1) < 0 or ckpt.get("optimizer") is None


def resume_point(last: Path, weights) -> tuple[Path, bool] | None:
    """Where a training stage starts: None when its run has already finished, else (its last.pt, True) to resume or
    (`weights`, False) for a new run."""
    if not last.exists():
        return Path(weights), False
    return None if run_finished(last) else (last, True)


# yoloslim's training stages, by the name of the metadata record each run writes and the command that runs it
TRAINING_STAGES = {"sparsity": "yoloslim train", "finetune": "yoloslim finetune"}


def check_resumable(last: str | Path, stage: str | None = None, **ignored) -> None:
    """Refuse to resume what cannot be resumed as asked: a missing or unreadable file, a finished run (Ultralytics
    would warn and start a new run on its default dataset, coco8), a run of another training stage than `stage`, or
    settings that a run keeps from its start (`ignored`: option name -> the value given, None when not given)."""
    given = [name for name, value in ignored.items() if value is not None]
    if given:
        raise YoloslimError(f"a resumed run keeps the settings it started with; drop {' and '.join(given)}")
    if not Path(last).is_file():
        raise YoloslimError(
            f"{last} {'is a folder' if Path(last).is_dir() else 'does not exist'}; resuming takes the last.pt of the "
            "run to continue (its weights/last.pt)"
        )
    try:
        ckpt = read_checkpoint(last)
        finished, ran = checkpoint_finished(ckpt), run_stage(ckpt)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise YoloslimError(
            f"{last} is not a readable checkpoint ({str(e).splitlines()[0]}); pass the run's weights/last.pt"
        ) from None
    if finished:
        raise YoloslimError(
            f"{last} is the end of a finished run, nothing to resume; use its best.pt, or train again without resuming"
        )
    if stage and ran and ran != stage:
        raise YoloslimError(f"{last} is an unfinished {ran} run; resume it with {TRAINING_STAGES[ran]} --resume")


def run_stage(ckpt: dict) -> str | None:
    """The training stage (a TRAINING_STAGES key) whose run wrote `ckpt`: the last of their records, since a stage
    moves its record last (yoloslim.utils.metadata.with_stage); None for a plain Ultralytics run."""
    stages = [name for name in checkpoint_metadata(ckpt) if name in TRAINING_STAGES]
    return stages[-1] if stages else None


def resume_run(
    last: str | Path, trainer, stage: str, data: str | Path | None = None, refused: dict | None = None, **train_args
):
    """Continue the `stage` run that ended in `last` with `trainer`, after check_resumable (`refused`: its
    `ignored`). A new `data` (already checked by resolve_data) passes through: Ultralytics takes a moved dataset's path
    on resume."""
    from ultralytics import YOLO

    check_resumable(last, stage, **(refused or {}))
    moved = {"data": str(data)} if data else {}
    return YOLO(str(last)).train(resume=True, trainer=trainer, **moved, **train_args)


def trainable_copy(model: nn.Module, nc: int) -> nn.Module:
    """The checkpoint's own module, ready to train: what a pruned model needs, since its yaml holds the original
    widths and Ultralytics' rebuild from the yaml would load only the tensors whose shapes still match."""
    trained_for = model.model[-1].nc  # the head's: a classic model of the original's releases before v6.2 has no nc
    if trained_for != nc:
        raise YoloslimError(
            f"the dataset has {nc} classes but the model was trained for {trained_for}; train on the dataset the model "
            "was trained on"
        )
    model = deepcopy(model).float()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def adam_bias_warmup(overrides: dict) -> dict:
    """Ultralytics' warm-up starts the biases' learning rate at warmup_bias_lr (0.1), a step size made for SGD; an
    Adam-family optimizer moves each bias by about that much per step, and a trained model loses most of its mAP in the
    first epoch. With such an optimizer the bias warm-up starts at zero, as optimizer=auto's does, unless it is set."""
    if str(overrides.get("optimizer", "")).lower() in ADAM_FAMILY:
        return {"warmup_bias_lr": 0.0, **overrides}
    return overrides


class SafeDetectionTrainer(DetectionTrainer):
    """DetectionTrainer with atomic checkpoint writes, yoloslim metadata in every checkpoint, and Adam's bias warm-up
    from zero (adam_bias_warmup)."""

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks: dict | None = None):
        super().__init__(cfg, adam_bias_warmup(overrides or {}), _callbacks)

    def checkpoint_extras(self) -> dict:
        """yoloslim metadata for the checkpoint's model: the input's (its prune, an earlier stage's settings);
        subclasses add theirs."""
        return dict(self.lineage())

    def lineage(self) -> dict:
        """The yoloslim metadata of the checkpoint this run started from, or continues on resume."""
        if not hasattr(self, "_lineage"):
            source = self.args.resume if self.resume else self.args.model
            self._lineage = read_checkpoint_extras(source) if str(source).endswith(".pt") else {}
        return self._lineage

    def save_metrics(self, metrics):
        drop_rows_from_epoch(self.csv, self.epoch + 1)
        super().save_metrics(metrics)

    def save_model(self):
        """Ultralytics' save_model, with yoloslim's metadata on the saved model, staged to temporary files that are
        renamed into place."""
        set_checkpoint_metadata(self.ema.ema, self.checkpoint_extras())  # save_model pickles a copy of the EMA
        final = (self.last, self.best)
        staged = [p.with_name(f".{p.name}.saving") for p in final]
        for path in staged:
            path.unlink(missing_ok=True)
        self.last, self.best = staged
        try:
            saved = super().save_model()
        finally:
            self.last, self.best = final
        for stage, target in zip(staged, final):
            if stage.exists():
                os.replace(stage, target)
        periodic = self.wdir / f"epoch{self.epoch}.pt"
        if self.save_period > 0 and self.epoch % self.save_period == 0 and periodic.exists():
            # Ultralytics wrote this snapshot of last.pt in place and without yoloslim's settings; replace it whole
            with atomic_path(periodic) as tmp:
                shutil.copyfile(self.last, tmp)
        return saved

    def final_eval(self):
        """Ultralytics' final_eval with the optimizer stripped through staged files: its own strips last.pt and
        best.pt in place, where a kill leaves a torn file."""
        with torch_distributed_zero_first(LOCAL_RANK):  # strip only on the first GPU; the others wait
            if RANK in {-1, 0}:
                self.finish_checkpoints()
        if self.best.exists():
            LOGGER.info(f"\nValidating {self.best}...")
            self.validator.args.plots = self.args.plots
            self.validator.args.compile = False  # as Ultralytics: a compiled final validation is too slow
            self.metrics = self.validator(model=self.best)
            self.metrics.pop("fitness", None)
            self.epoch += 1  # logged as the step after the last epoch, as Ultralytics does
            self.run_callbacks("on_fit_epoch_end")
            self.epoch -= 1

    def finish_checkpoints(self) -> None:
        """Write last.pt and best.pt in their final form, once each, as the run ends: here stripped of the optimizer."""
        ckpt = strip_optimizer_atomic(self.last) if self.last.exists() else {}
        if self.best.exists():
            strip_optimizer_atomic(self.best, updates={"train_results": ckpt.get("train_results")})


def strip_optimizer_atomic(f, s: str = "", updates=None) -> dict:
    """ultralytics' strip_optimizer, writing to a temporary file renamed onto the target."""
    target = Path(s or f)
    stage = target.with_name(f".{target.name}.stripping")
    try:
        ckpt = strip_optimizer(f, s=str(stage), updates=updates)
        if ckpt:
            os.replace(stage, target)
        return ckpt
    finally:
        stage.unlink(missing_ok=True)


def drop_rows_from_epoch(csv: Path, epoch: int) -> None:
    """Remove results.csv rows of `epoch` (1-based) and later: a run killed after logging an epoch but before saving
    it redoes that epoch on resume, and Ultralytics would otherwise log it twice."""
    if not csv.exists():
        return
    header, *rows = csv.read_text().splitlines()
    kept = [row for row in rows if int(float(row.split(",")[0])) < epoch]
    if len(kept) < len(rows):
        write_text_atomic(csv, "\n".join([header, *kept]) + "\n")
