from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from yoloslim.finetune import FinetuneTrainer, finetune, revive_dead_channels
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


def dead_chain() -> nn.Sequential:
    """A live conv block, two whose gammas are all zero (as sparsity training leaves a whole stage), and a live one."""
    from ultralytics.nn.modules import Conv

    torch.manual_seed(0)
    chain = nn.Sequential(Conv(3, 8, 3), Conv(8, 8, 3), Conv(8, 8, 1), Conv(8, 4, 1))
    for block in chain[1:3]:
        nn.init.zeros_(block.bn.weight)
        nn.init.uniform_(block.bn.bias, -1.0, 1.0)
    return chain.train()


def gamma_gradients(chain: nn.Sequential) -> list[float]:
    """Each block's largest gamma gradient, and last the output block's largest beta gradient (never zero)."""
    chain.zero_grad()
    chain(torch.randn(4, 3, 16, 16)).square().mean().backward()
    return [block.bn.weight.grad.abs().max().item() for block in chain] + [chain[-1].bn.bias.grad.abs().max().item()]


def test_a_dead_stage_learns_only_once_revived():
    """Zero gammas over a constant input are a fixed point: no layer of the chain gets a gamma gradient, so training
    would never leave it; revived to a small gamma, every layer does."""
    chain = dead_chain()
    dead = gamma_gradients(chain)
    assert dead[1] == 0.0 and dead[2] < 1e-6 * dead[-1]

    assert revive_dead_channels(chain, 0.01) == 16
    assert [b.bn.weight.eq(0.01).sum().item() for b in chain] == [0, 8, 8, 0]
    revived = gamma_gradients(chain)
    assert min(revived[:4]) > 1e-3 * revived[-1]


@pytest.mark.slow
def test_a_finetune_revives_a_dead_stage_that_stays_dead_without_it(pruned_pt, train_args, tiny_data, tmp_path):
    """The stride-32 backbone (layers 7 to 9) with every gamma zero, as sparsity training leaves it on real data."""
    from ultralytics import YOLO

    def stage_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
        return [
            m
            for name, m in model.named_modules()
            if name.split(".")[1:2] in (["7"], ["8"], ["9"]) and isinstance(m, nn.BatchNorm2d)
        ]

    def stage_gammas(model: nn.Module) -> torch.Tensor:
        return torch.cat([m.weight.data.float() for m in stage_norms(model)])

    def saved_gammas(path) -> torch.Tensor:
        ckpt = torch.load(path, weights_only=False)
        return stage_gammas(ckpt.get("ema") or ckpt["model"])

    _, pruned = pruned_pt
    ckpt = torch.load(pruned, weights_only=False)
    for norm in stage_norms(ckpt.get("ema") or ckpt["model"]):
        norm.weight.data.zero_()
    dead = tmp_path / "dead.pt"
    torch.save(ckpt, dead)

    for revive, name in ((0.0, "kept"), (0.01, "revived")):
        run = YOLO(str(dead))
        run.train(
            data=str(tiny_data), trainer=partial(FinetuneTrainer, revive=revive), **run_args(train_args, name=name)
        )
        gammas = saved_gammas(run.trainer.last)
        assert gammas.eq(0).all() if not revive else gammas.ne(0).all() and gammas.ne(revive).all()
