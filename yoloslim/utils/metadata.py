"""yoloslim's metadata in a checkpoint: a dict of plain values on the checkpoint's model, as its `yoloslim`
attribute, so that it travels with the model from stage to stage, survives Ultralytics' own saves and strips, and
loads with plain `YOLO(path)` (also under ULTRALYTICS_SAFE_LOAD)."""

from __future__ import annotations

CHECKPOINT_KEY = "yoloslim"


def with_stage(metadata: dict, stage: str, record: dict) -> dict:
    """`metadata` with `stage`'s record last, also when an earlier cycle wrote one: the order of the keys is the order
    of the stages, so a reader knows which came last (a sparsity record followed by a prune's is no longer current)."""
    return {**{k: v for k, v in metadata.items() if k != stage}, stage: record}


def checkpoint_metadata(ckpt: dict) -> dict:
    """The yoloslim metadata of a loaded checkpoint (empty for a plain Ultralytics one)."""
    model = ckpt.get("model") or ckpt.get("ema")  # a finished run keeps "model", an unfinished one "ema"
    found = getattr(_detector(model), CHECKPOINT_KEY, None)
    return dict(found if found is not None else ckpt.get(CHECKPOINT_KEY) or {})  # earlier versions: a top-level key


def set_checkpoint_metadata(model, metadata: dict) -> None:
    """Attach yoloslim's metadata to the model a checkpoint is about to pickle."""
    setattr(_detector(model), CHECKPOINT_KEY, metadata)


def _detector(model):
    """The detector itself: under distillation Ultralytics saves a wrapper around it during training and unwraps it
    when the run ends, so the metadata lives on the student to survive that."""
    return getattr(model, "student_model", model)
