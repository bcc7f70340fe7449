import csv
import json
import math
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ultralytics.cfg import DEFAULT_CFG

from yoloslim.config import TARGETED_SR, UNIFORM_SR
from yoloslim.sparsity import (
    GAMMA_HISTORY,
    GAMMA_PLOT,
    STALL_FACTOR,
    SparsityCallback,
    SparsityConfig,
    SparsityTrainer,
    count_stalls,
    gamma_magnitudes,
    prunable_batchnorms,
    zeroed_flops_fraction,
)
from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.metadata import checkpoint_metadata


def read_results(run_dir: Path) -> list[dict]:
    with open(run_dir / "results.csv") as f:
        return [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def train(train_args, config, **overrides) -> SparsityTrainer:
    trainer = SparsityTrainer(overrides={**train_args, **overrides}, sparsity=config)
    trainer.train()
    return trainer


# -- settings -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        dict(sr=-1e-3),
        dict(sr=float("nan")),
        dict(schedule="step"),
        dict(final_ratio=2.0),
        dict(stop_at_flops=1.0),
        dict(stop_at_flops=0.5, round_to=0),
        dict(stop_at_flops=0.5, min_keep=1.5),
        dict(stall_epochs=-1),
        dict(targeted=True, stop_at_flops=0),
    ],
)
def test_bad_settings_are_refused(bad):
    with pytest.raises(YoloslimError):
        SparsityConfig(**bad)


@pytest.mark.parametrize("targeted,sr,optimizer", [(True, TARGETED_SR, "auto"), (False, UNIFORM_SR, "SGD")])
def test_each_route_trains_with_its_measured_strength_and_recipe(
    shipped_weights, tiny_data, monkeypatch, targeted, sr, optimizer
):
    """train_sparse hands Ultralytics the route's recipe under the user's arguments, and sr defaults per route."""
    from ultralytics.engine.model import Model

    from yoloslim.sparsity import train_sparse

    config = SparsityConfig(targeted=targeted)
    assert config.sr == sr and SparsityConfig(targeted=targeted, sr=0.5).sr == 0.5
    called = {}
    monkeypatch.setattr(Model, "train", lambda self, **kwargs: called.update(kwargs))
    train_sparse(str(shipped_weights), config, data=str(tiny_data), batch=2)
    assert called["optimizer"] == optimizer and called["epochs"] == config.recipe().epochs
    assert called["batch"] == 2  # the user's argument over the recipe's
    # at the recipe's own batch every batch is an optimizer step, and so a penalty step (Ultralytics accumulates
    # gradients over nbs / batch batches): the measured stage lengths depend on it
    recipe = config.recipe()
    assert max(round((recipe.nbs or DEFAULT_CFG.nbs) / recipe.batch), 1) == 1


def test_schedules_start_at_sr_and_end_at_final_ratio():
    for schedule in ("linear", "cosine"):
        config = SparsityConfig(sr=1e-2, schedule=schedule, final_ratio=0.1)
        values = [config.sr_at(e, 11) for e in range(11)]
        assert values[0] == pytest.approx(1e-2) and values[-1] == pytest.approx(1e-3)
        assert all(a > b for a, b in zip(values, values[1:])), "decay must be strictly decreasing"
    assert SparsityConfig(sr=1e-2, schedule="linear").sr_at(5, 11) == pytest.approx(5e-3)
    assert SparsityConfig(sr=1e-2, schedule="cosine").sr_at(5, 11) == pytest.approx(5e-3)
    assert SparsityConfig(sr=1e-2).sr_at(7, 11) == 1e-2


def test_head_batchnorms_are_excluded_unless_asked():
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov5n.yaml", nc=3, verbose=False)
    body = prunable_batchnorms(model)
    everything = prunable_batchnorms(model, include_head=True)
    head = len(model.model) - 1
    assert body and all(not name.startswith(f"model.{head}.") for name, _ in body)
    assert len(everything) > len(body)


# -- the penalty ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_sparsity_drives_gamma_towards_zero(train_args, optimizer):
    args = dict(train_args, optimizer=optimizer, lr0=0.01, epochs=3)
    plain = train(args, SparsityConfig(targeted=False, sr=0.0), name="plain")
    sparse = train(args, SparsityConfig(targeted=False, sr=3.0), name="sparse")
    for attr in ("model", "ema"):  # the live model and the saved EMA both move
        g_plain = gamma_magnitudes(plain.model if attr == "model" else plain.ema.ema)
        g_sparse = gamma_magnitudes(sparse.model if attr == "model" else sparse.ema.ema)
        assert np.median(g_sparse) < np.median(g_plain) - 0.05, attr


@pytest.mark.slow
def test_run_ends_once_the_zeroed_channels_give_the_target_prune(train_args):
    args = dict(train_args, optimizer="SGD", lr0=0.01, epochs=6, val=False)
    config = SparsityConfig(targeted=False, sr=30.0, include_head=True, stop_at_flops=0.9, round_to=1)
    stopped = train(args, config, name="stopped")
    kept = [row["sparsity/zeroed_flops"] for row in read_results(stopped.save_dir)]
    assert len(kept) < 6 and kept[-1] <= 0.9 and all(k > 0.9 for k in kept[:-1])
    assert kept[-1] == pytest.approx(zeroed_flops_fraction(stopped.ema.ema, config, 64), abs=1e-4)
    unreachable = train(
        args,
        SparsityConfig(targeted=False, sr=30.0, include_head=True, stop_at_flops=0.01, round_to=1),
        name="unreachable",
    )
    assert len(read_results(unreachable.save_dir)) == 6


@pytest.mark.slow
def test_targeted_run_zeroes_its_targets_stops_and_leaves_the_rest_unpenalised(train_args):
    """A targeted run reaches the stop by shrinking only the planned removals, at an sr that would zero anything."""
    args = dict(train_args, optimizer="SGD", lr0=0.01, epochs=6, val=False)
    config = SparsityConfig(sr=30.0, include_head=True, stop_at_flops=0.9, round_to=1, targeted=True)
    stopped = train(args, config, name="targeted")
    rows = read_results(stopped.save_dir)
    assert len(rows) < 6 and rows[-1]["sparsity/zeroed_flops"] <= 0.9
    assert all(row["sparsity/targeted"] > 0 for row in rows)
    # what the last plan keeps was never zeroed (a zeroed channel scores lowest, so the plan would still remove it)
    for name, bn in prunable_batchnorms(stopped.model, include_head=True):
        kept = torch.ones(bn.num_features, dtype=torch.bool)
        kept[stopped._targets.get(name, torch.tensor([], dtype=torch.long)).cpu()] = False
        assert (bn.weight.detach()[kept].abs() > 1e-2).all(), name


@pytest.mark.parametrize(
    "zeroed_flops,stalls",
    [
        ([1.0] * 12, 0),  # before any channel counts as zeroed, a still figure is no stall
        ([1.0, 0.8, 0.6, 0.52, 0.52, 0.52, 0.52, 0.5], 0),  # four epochs still, then the last targets give way
        ([1.0, 0.7, 0.501, 0.501, 0.501, 0.501, 0.501, 0.501], 1),
        ([1.0, 0.7, 0.501] + [0.501] * 10, 2),  # still after the rise too: it rises again
        ([0.9, 0.90005, 0.89995, 0.9, 0.9, 0.9], 1),  # moves inside the tolerance only
    ],
)
def test_stalls_are_epochs_without_a_new_low(zeroed_flops, stalls):
    assert count_stalls(zeroed_flops, 5) == stalls


def test_sr_rises_after_a_stall_of_the_logged_epochs_only(tmp_path):
    trainer = SparsityTrainer.__new__(SparsityTrainer)
    trainer.csv, trainer.epochs = tmp_path / "results.csv", 30
    logged = [(1, 1.0), (2, 0.6), (3, 0.6), (4, 0.6), (5, 0.6)]
    trainer.csv.write_text("epoch,sparsity/zeroed_flops\n" + "".join(f"{e},{k}\n" for e, k in logged))
    trainer.sparsity = SparsityConfig(sr=1.0, stall_epochs=3)
    trainer.epoch = 5  # the sixth epoch: 0.6 since the second, three epochs without a new low
    assert trainer.epoch_sr() == STALL_FACTOR
    trainer.epoch = 4  # the fifth again, after an interruption: its logged row is not history
    assert trainer.epoch_sr() == 1.0
    trainer.epoch = 5
    for same_penalty in (dict(schedule="linear"), dict(targeted=False, include_head=True), dict(stall_epochs=0)):
        trainer.sparsity = SparsityConfig(sr=1.0, **{"stall_epochs": 3, **same_penalty})
        assert trainer.epoch_sr() == trainer.sparsity.sr_at(5, 30), same_penalty


def test_the_stop_measures_the_prune_with_its_guards():
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov5n.yaml", nc=2, verbose=False)
    for _, bn in prunable_batchnorms(model, include_head=True):
        bn.weight.data.zero_()
    guarded = [
        zeroed_flops_fraction(model, SparsityConfig(stop_at_flops=0.5, round_to=1, min_keep=keep), 64)
        for keep in (0.0, 1.0)
    ]
    assert guarded[0] < 0.5 and guarded[1] == pytest.approx(1.0)


def _snapshot(trainer):
    return (
        deepcopy(trainer.model.state_dict()),
        [p.grad.clone() if p.grad is not None else None for p in trainer.model.parameters()],
        deepcopy(trainer.optimizer.state_dict()),
        deepcopy(trainer.scaler.state_dict()),
    )


def _restore(trainer, snapshot):
    weights, grads, optimizer, scaler = snapshot
    trainer.model.load_state_dict(weights)
    for p, g in zip(trainer.model.parameters(), grads):
        p.grad = None if g is None else g.clone()
    trainer.optimizer.load_state_dict(deepcopy(optimizer))
    trainer.scaler.load_state_dict(deepcopy(scaler))


def _gammas(trainer):
    return [bn.weight.detach().clone() for _, bn in prunable_batchnorms(trainer.model)]


def _steps_without_and_with(trainer, sr):
    """Gammas after one optimizer step without the penalty and, from the same state, after one with sr."""
    snapshot = _snapshot(trainer)
    trainer.sr = 0.0
    trainer.optimizer_step()
    reference = _gammas(trainer)
    _restore(trainer, snapshot)
    trainer.sr = sr
    trainer.optimizer_step()
    return reference, _gammas(trainer)


def _group_lr(trainer, weight):
    return next(g["lr"] for g in trainer.optimizer.param_groups if any(p is weight for p in g["params"]))


@pytest.mark.parametrize(
    ("optimizer", "batch"),
    [("SGD", 2), ("SGD", 4), ("AdamW", 2), ("AdamW", 4)],
)
def test_one_step_penalty_matches_definition(train_args, optimizer, batch):
    """Whatever the optimizer, batch, clipping and loss scale: gamma_sr == soft_threshold(gamma_plain, lr * sr)."""
    sr = 0.5
    trainer = SparsityTrainer(
        overrides=dict(train_args, optimizer=optimizer, lr0=0.02, batch=batch),
        sparsity=SparsityConfig(targeted=False, sr=sr),
    )
    trainer._setup_train()
    # Ultralytics turns AMP off on the CPU; an enabled scaler with a large scale exercises the unscale path.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, enabled=True)
    batch_data = trainer.preprocess_batch(next(iter(trainer.train_loader)))
    loss, _ = trainer.model(batch_data)
    trainer.scaler.scale(loss.sum() * 100).backward()  # large gradients, so the norm clip at 10 is active
    unscaled_norm = torch.norm(torch.stack([p.grad.norm() for p in trainer.model.parameters() if p.grad is not None]))
    assert unscaled_norm / trainer.scaler.get_scale() > 10
    reference, penalised = _steps_without_and_with(trainer, sr)

    batchnorms = [bn for _, bn in prunable_batchnorms(trainer.model)]
    changed = 0
    for bn, ref, got in zip(batchnorms, reference, penalised):
        amount = _group_lr(trainer, bn.weight) * sr
        assert amount > 0
        expected = ref.sign() * (ref.abs() - amount).clamp(min=0)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
        changed += int((got != ref).sum())
    assert changed > 0


def test_a_targeted_stop_out_of_the_models_reach_is_refused_before_the_first_step(train_args):
    trainer = SparsityTrainer(overrides=train_args, sparsity=SparsityConfig(stop_at_flops=0.01))
    trainer._setup_train()
    with pytest.raises(YoloslimError, match="stop_at_flops 0.01, out of this model's reach.*--no-targeted"):
        trainer.select_targets()


def test_targeted_penalty_falls_only_on_the_planned_removals(train_args):
    """Targeted: the channels a prune to stop_at_flops would remove get the soft threshold, every other gamma steps as
    without a penalty."""
    from yoloslim.prune import PruneConfig, planned_removals

    sr = 0.5
    config = SparsityConfig(sr=sr, targeted=True, stop_at_flops=0.5, round_to=8)
    trainer = SparsityTrainer(overrides=dict(train_args, optimizer="SGD", lr0=0.02), sparsity=config)
    trainer._setup_train()
    trainer.select_targets()
    plan = planned_removals(
        trainer.model, PruneConfig(target_flops=0.5, round_to=8, min_keep=config.min_keep, imgsz=trainer.args.imgsz)
    )
    assert plan and {n: t.tolist() for n, t in trainer._targets.items()} == {
        n: i for n, i in plan.items() if n in trainer._penalised_names
    }
    loss, _ = trainer.model(trainer.preprocess_batch(next(iter(trainer.train_loader))))
    loss.sum().backward()
    reference, penalised = _steps_without_and_with(trainer, sr)

    shrunk_channels = kept_channels = 0
    for (name, bn), ref, got in zip(prunable_batchnorms(trainer.model), reference, penalised):
        expected = ref.clone()
        targets = plan.get(name, [])
        amount = _group_lr(trainer, bn.weight) * sr
        expected[targets] = ref[targets].sign() * (ref[targets].abs() - amount).clamp(min=0)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
        shrunk_channels += len(targets)
        kept_channels += len(ref) - len(targets)
    assert shrunk_channels > 0 and kept_channels > 0


def test_step_skipped_by_amp_adds_no_penalty(train_args):
    trainer = SparsityTrainer(overrides=train_args, sparsity=SparsityConfig(targeted=False, sr=1.0))
    trainer._setup_train()
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, enabled=True)
    loss, _ = trainer.model(trainer.preprocess_batch(next(iter(trainer.train_loader))))
    trainer.scaler.scale(loss.sum()).backward()
    next(p for p in trainer.model.parameters() if p.grad is not None).grad.fill_(float("inf"))
    before = _gammas(trainer)
    trainer.optimizer_step()
    for a, b in zip(before, _gammas(trainer)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- monitoring, checkpoints, resume ------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def _interrupt_after_epoch(epoch):
    def callback(trainer):
        if trainer.epoch == epoch:
            raise Interrupt

    return callback


@pytest.mark.slow
def test_resume_continues_schedule_with_checkpoint_settings(train_args):
    from ultralytics import YOLO

    config = SparsityConfig(targeted=False, sr=0.2, schedule="linear", final_ratio=0.25)
    first = SparsityTrainer(overrides=dict(train_args, epochs=3, plots=True, save_period=1), sparsity=config)
    first.add_callback("on_model_save", _interrupt_after_epoch(0))
    with pytest.raises(Interrupt):
        first.train()
    last = first.last
    for snapshot in (last, last.with_name("epoch0.pt")):  # a save_period snapshot resumes with the settings too
        assert checkpoint_metadata(torch.load(snapshot, weights_only=False))["sparsity"]["schedule"] == "linear"

    model = YOLO(str(last))
    model.train(resume=True, trainer=SparsityTrainer)  # no settings given: they come from the checkpoint
    assert model.trainer.sparsity == config
    rows = read_results(first.save_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [r["sparsity/sr"] for r in rows] == pytest.approx([config.sr_at(e, 3) for e in range(3)])
    history = json.loads((first.save_dir / GAMMA_HISTORY).read_text())
    assert [e["epoch"] for e in history["epochs"]] == [0, 1, 2]
    assert (first.save_dir / GAMMA_PLOT).stat().st_size > 0
    for name in ("gamma/p50", "gamma/below_1e-2", "gamma/below_1e-3"):
        assert all(math.isfinite(r[name]) for r in rows)

    # the final strip keeps the settings, and the output is an ordinary Ultralytics detection checkpoint
    best = torch.load(first.best, weights_only=False)
    assert best["optimizer"] is None and checkpoint_metadata(best)["sparsity"]["sr"] == 0.2
    last = torch.load(first.last, weights_only=False)
    assert [e["epoch"] for e in checkpoint_metadata(last)["gamma_history"]["epochs"]] == [0, 1, 2]
    loaded = YOLO(str(first.best))
    assert loaded.task == "detect" and loaded.names == yaml.safe_load(Path(train_args["data"]).read_text())["names"]


def test_ddp_round_trip_keeps_settings(train_args):
    """Replays what Ultralytics' DDP launcher does: pickle class, args, model and callbacks; rebuild in a worker."""
    from ultralytics.utils import DEFAULT_CFG_DICT
    from ultralytics.utils.dist import generate_ddp_file
    from ultralytics.utils.patches import torch_load

    config = SparsityConfig(targeted=False, sr=7e-4, schedule="cosine", final_ratio=0.5, include_head=True)
    trainer = SparsityTrainer(overrides=train_args, sparsity=config)
    script = Path(generate_ddp_file(trainer))
    state_file = script.with_suffix(".pt")
    try:
        state = torch_load(state_file, map_location="cpu")
        assert 'trainer.model = state["model"]' in script.read_text()  # the launcher still rebuilds this way
    finally:
        script.unlink(missing_ok=True)
        state_file.unlink(missing_ok=True)
    cfg = DEFAULT_CFG_DICT.copy()
    cfg.update(save_dir="")
    worker = state["trainer"](cfg=cfg, overrides=state["args"], _callbacks=state["callbacks"])
    assert type(worker) is SparsityTrainer
    assert worker.sparsity == config
    assert sum(isinstance(c, SparsityCallback) for c in worker.callbacks["on_train_epoch_start"]) == 1


@pytest.mark.slow
def test_best_checkpoint_is_the_latest_epoch(train_args, monkeypatch):
    """Validation mAP usually falls while the gammas split; best.pt must still be the latest, sparsest model."""
    from ultralytics.engine.trainer import BaseTrainer

    ultralytics_validate = BaseTrainer.validate

    def falling_fitness(self):
        metrics, _ = ultralytics_validate(self)
        fitness = 1.0 - self.epoch  # each epoch less fit than the one before
        if self.best_fitness is None or self.best_fitness < fitness:
            self.best_fitness = fitness
        return metrics, fitness

    monkeypatch.setattr(BaseTrainer, "validate", falling_fitness)
    trainer = train(train_args, SparsityConfig(targeted=False, sr=0.1))
    best, last = (torch.load(path, weights_only=False)["model"].state_dict() for path in (trainer.best, trainer.last))
    assert all(torch.equal(best[k], last[k]) for k in last)


@pytest.mark.slow
def test_interrupted_save_leaves_previous_checkpoint_resumable(train_args, monkeypatch):
    from ultralytics import YOLO

    trainer = SparsityTrainer(overrides=dict(train_args, epochs=3), sparsity=SparsityConfig(targeted=False, sr=0.1))
    real_write = Path.write_bytes
    saves = []

    def killed_mid_write(self, data):
        saves.append(self.name)
        if (
            sum(n.endswith(".saving") for n in saves) > 2
        ):  # epoch 1 writes last and best; the next write dies halfway through
            real_write(self, data[: len(data) // 2])
            raise Interrupt
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", killed_mid_write)
    with pytest.raises(Interrupt):
        trainer.train()
    monkeypatch.undo()

    ckpt = torch.load(trainer.last, weights_only=False)  # intact: the torn write went to a staging file
    assert ckpt["epoch"] == 0
    model = YOLO(str(trainer.last))
    model.train(resume=True, trainer=SparsityTrainer)
    assert [int(r["epoch"]) for r in read_results(trainer.save_dir)] == [1, 2, 3]
