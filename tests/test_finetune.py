from pathlib import Path

import pytest
import torch
from torch import nn

from yoloslim.finetune import FinetuneTrainer, finetune
from yoloslim.prune import PruneConfig, prune
from yoloslim.utils.metadata import checkpoint_metadata


def conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def saved_widths(path) -> list[int]:
    ckpt = torch.load(path, weights_only=False)
    return conv_widths(ckpt.get("ema") or ckpt["model"])


@pytest.fixture(scope="module")
def pruned_pt(tmp_path_factory, shipped_weights):
    """The shipped baseline (trained on the classes of the tiny dataset) and that model pruned by 40%."""
    out = tmp_path_factory.mktemp("ft") / "pruned.pt"
    prune(shipped_weights, PruneConfig(ratio=0.4, imgsz=64), out=out)
    return shipped_weights, out


def run_args(train_args, **extra):
    return {k: v for k, v in dict(train_args, **extra).items() if k not in {"model", "data"}}


class Interrupt(Exception):
    pass


def stop_after_first_save(trainer):
    raise Interrupt


@pytest.mark.slow
def test_finetuning_keeps_pruned_widths_also_after_resume(pruned_pt, train_args, tiny_data):
    from ultralytics import YOLO

    base, pruned = pruned_pt
    widths = saved_widths(pruned)
    assert widths != saved_widths(base)

    model = YOLO(str(pruned))
    model.add_callback("on_model_save", stop_after_first_save)
    with pytest.raises(Interrupt):
        model.train(data=str(tiny_data), trainer=FinetuneTrainer, **run_args(train_args, epochs=2))
    last = model.trainer.last
    assert saved_widths(last) == widths

    resumed = YOLO(str(last))
    resumed.train(resume=True, trainer=FinetuneTrainer)
    for path in (resumed.trainer.last, resumed.trainer.best):
        ckpt = torch.load(path, weights_only=False)
        assert conv_widths(ckpt["model"]) == widths
        assert checkpoint_metadata(ckpt)["prune"]["settings"]["ratio"] == 0.4  # the lineage travels with the model


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,  # the widths differ; an error of the run itself is not this known failure
    reason="Ultralytics' trainer rebuilds a checkpoint's model from its yaml, so plain training of a pruned model "
    "trains the original widths; `yoloslim finetune` exists for this. Passing means Ultralytics keeps the widths now.",
)
def test_plain_ultralytics_training_keeps_pruned_widths(pruned_pt, train_args, tiny_data):
    from ultralytics import YOLO

    base, pruned = pruned_pt
    model = YOLO(str(pruned))
    model.train(data=str(tiny_data), **run_args(train_args, epochs=1, name="trap"))
    assert saved_widths(model.trainer.last) == saved_widths(pruned) != saved_widths(base)


@pytest.mark.slow
def test_distillation_keeps_student_widths_also_after_resume(pruned_pt, train_args, tiny_data):
    from ultralytics import YOLO

    base, pruned = pruned_pt
    widths = saved_widths(pruned)
    model = YOLO(str(pruned))
    model.add_callback("on_model_save", stop_after_first_save)
    with pytest.raises(Interrupt):
        model.train(
            data=str(tiny_data),
            trainer=FinetuneTrainer,
            distill_model=str(base),
            **run_args(train_args, epochs=2, name="distill"),
        )
    finetune(model.trainer.last, resume=True)  # its model is a DistillationModel around the student
    ckpt = torch.load(Path(train_args["project"]) / "distill" / "weights" / "best.pt", weights_only=False)
    assert conv_widths(ckpt["model"]) == widths and ckpt["epoch"] == -1
    assert checkpoint_metadata(ckpt)["finetune"]["teacher"] == str(base)


def test_a_finished_run_is_not_resumed(pruned_pt, tmp_path):
    from yoloslim.utils.errors import YoloslimError
    from yoloslim.utils.training import resume_point

    _, pruned = pruned_pt  # a saved model without optimizer state, as Ultralytics leaves a finished run's last.pt
    with pytest.raises(YoloslimError, match="end of a finished run, nothing to resume"):
        finetune(pruned, resume=True)
    assert resume_point(pruned, "start.pt") is None
    assert resume_point(tmp_path / "last.pt", "start.pt") == (Path("start.pt"), False)


@pytest.mark.slow
def test_sparsity_training_a_pruned_model_keeps_its_widths(pruned_pt, train_args, tiny_data):
    """Iterative slimming: a pruned model's yaml holds the original widths, the trap finetuning avoids."""
    from yoloslim.sparsity import SparsityConfig, train_sparse

    _, pruned = pruned_pt
    train_sparse(
        str(pruned), SparsityConfig(sr=0.01), data=str(tiny_data), **run_args(train_args, epochs=1, name="resparse")
    )
    ckpt = torch.load(Path(train_args["project"]) / "resparse" / "weights" / "last.pt", weights_only=False)
    assert conv_widths(ckpt["model"]) == saved_widths(pruned)
    meta = checkpoint_metadata(ckpt)
    assert meta["prune"]["settings"]["ratio"] == 0.4 and meta["sparsity"]["sr"] == 0.01


@pytest.mark.parametrize(
    "optimizer, given, first_bias_lr", [("AdamW", {}, 0.0), ("AdamW", {"warmup_bias_lr": 0.05}, 0.05), ("SGD", {}, 0.1)]
)
def test_adam_biases_warm_up_from_zero_unless_told_otherwise(
    pruned_pt, train_args, tiny_data, optimizer, given, first_bias_lr
):
    """Ultralytics' bias warm-up starts at 0.1, an SGD step size; under AdamW it wrecks a trained model in epoch one."""
    from ultralytics import YOLO

    seen = []

    def record_first_step(trainer):
        seen.extend(g["lr"] for g in trainer.optimizer.param_groups if g["param_group"] == "bias")
        raise Interrupt

    model = YOLO(str(pruned_pt[1]))
    model.add_callback("on_train_batch_end", record_first_step)
    with pytest.raises(Interrupt):
        model.train(
            data=str(tiny_data),
            trainer=FinetuneTrainer,
            **run_args(train_args, optimizer=optimizer, lr0=0.002, warmup_epochs=1, **given),
        )
    assert seen == [pytest.approx(first_bias_lr)]
