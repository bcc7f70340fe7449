"""What every yoloslim trainer adds to Ultralytics' DetectionTrainer (yoloslim/utils/training.py)."""

from pathlib import Path

import pytest
import torch

from yoloslim.config import SparsityConfig
from yoloslim.sparsity import SparsityTrainer


class Interrupt(Exception):
    pass


def test_a_kill_during_the_final_strip_leaves_last_pt_whole(train_args, monkeypatch):
    """Ultralytics strips the optimizer from last.pt and best.pt in place at the end of a run; yoloslim's trainers
    write the stripped file beside it and rename it, so a kill in the middle leaves the unstripped file readable."""
    real_save = torch.save

    def killed_while_stripping(obj, f, *args, **kwargs):
        if isinstance(f, (str, Path)) and Path(f).name.endswith(".stripping"):
            Path(f).write_bytes(b"PK\x03\x04 torn")
            raise Interrupt
        return real_save(obj, f, *args, **kwargs)

    trainer = SparsityTrainer(
        overrides=dict(train_args, epochs=1), sparsity=SparsityConfig(targeted=False, sr=0, stop_at_flops=0)
    )
    monkeypatch.setattr(torch, "save", killed_while_stripping)
    with pytest.raises(Interrupt):
        trainer.train()
    monkeypatch.undo()
    ckpt = torch.load(trainer.last, weights_only=False)
    assert ckpt["optimizer"] is not None and ckpt["epoch"] == 0  # the whole, unstripped epoch-1 checkpoint
    assert not list(trainer.wdir.glob(".*.stripping"))


def test_a_checkpoint_of_an_earlier_release_resumes_with_the_settings_it_still_has(train_args, monkeypatch):
    """Checkpoints written before `weighting` was removed still name it; resuming them must not fail on it."""
    saved = {"sr": 0.2, "schedule": "linear", "final_ratio": 0.5, "include_head": True, "weighting": "uniform"}
    monkeypatch.setattr(SparsityTrainer, "lineage", lambda self: {"sparsity": saved})
    trainer = SparsityTrainer(overrides=train_args, sparsity=SparsityConfig(targeted=False, sr=0.1))
    assert trainer._config_from_checkpoint() == SparsityConfig(
        sr=0.2, schedule="linear", final_ratio=0.5, targeted=False
    )  # stored before targeted existed: a uniform run


@pytest.mark.parametrize(("ran", "resumed_by"), [("finetune", "sparsity"), ("sparsity", "finetune")])
def test_a_run_is_resumed_only_by_its_own_stage(ran, resumed_by, tmp_path):
    from torch import nn

    from yoloslim.utils.errors import YoloslimError
    from yoloslim.utils.metadata import set_checkpoint_metadata
    from yoloslim.utils.training import TRAINING_STAGES, check_resumable

    model = nn.Conv2d(1, 1, 1)
    set_checkpoint_metadata(model, {"prune": {}, ran: {}})
    last = tmp_path / "last.pt"
    torch.save({"ema": model, "model": None, "epoch": 0, "optimizer": {"state": {}}}, last)
    check_resumable(last, ran)
    with pytest.raises(YoloslimError, match=f"unfinished {ran} run; resume it with {TRAINING_STAGES[ran]}"):
        check_resumable(last, resumed_by)


def test_targeted_sparsity_keeps_autos_adamw_on_long_runs(train_args):
    trainer = SparsityTrainer(overrides=train_args)
    optimizer = trainer.build_optimizer(trainer.get_model(cfg="yolov5n.yaml"), "auto", 0.01, 0.9, 5e-4, 1e6)
    assert type(optimizer) is torch.optim.AdamW  # past 10,000 iterations auto alone picks MuSGD at 0.01


def test_frozen_gammas_are_refused_by_the_targeted_penalty_and_spared_by_the_uniform_one(train_args):
    from yoloslim.utils.errors import YoloslimError

    with pytest.raises(YoloslimError, match="freeze"):
        SparsityTrainer(overrides=dict(train_args, freeze=3))
    trainer = SparsityTrainer(overrides=dict(train_args, freeze=3), sparsity=SparsityConfig(targeted=False))
    model = trainer.get_model(cfg="yolov5n.yaml")
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(("model.0.", "model.1.", "model.2.")))
    trainer.build_optimizer(model, "SGD", 0.01, 0.9, 5e-4, 100)
    assert trainer._penalised_names and not any(
        n.startswith(("model.0.", "model.1.", "model.2.")) for n in trainer._penalised_names
    )
