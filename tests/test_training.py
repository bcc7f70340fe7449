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
