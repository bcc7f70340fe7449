"""Sparsity training (Network Slimming, Liu et al. 2017): L1 on BatchNorm scale factors, as an Ultralytics plugin.

Definition of `sr`. After every optimizer step Ultralytics actually takes (one per nominal batch of `nbs` images; a
step that AMP skips for inf gradients adds no penalty either), each prunable BatchNorm scale gamma in a parameter
group whose current learning rate is lr is soft-thresholded:

    gamma <- sign(gamma) * max(|gamma| - lr * sr_t, 0)

This is the proximal step of the penalty sr_t * sum|gamma| with step size lr: what plain SGD does to that term. It is
applied after the optimizer's own step, on the parameters directly, so Adam's gradient normalisation, the AMP loss
scale, the loss being multiplied by the batch size, gradient accumulation and gradient-norm clipping cannot change it.
sr_t follows the schedule (constant, linear or cosine decay to `final_ratio * sr` at the last epoch); a targeted run
under a constant penalty triples it after each `stall_epochs` epochs without new zeroed channels (see epoch_sr). Both
depend only on the epoch and the epochs logged in results.csv, so a resumed run continues them exactly.

Targeted (SparsityConfig.targeted): at each epoch start the later prune's own plan for stop_at_flops, made from the
model as it stands, names the channels it would remove, and only their gammas take the step; the channels the prune
keeps train as without a penalty, so nothing of what the pruned model keeps is shrunk first.


Settings travel with the run: a SparsityCallback in the trainer's callbacks carries them into DDP workers (Ultralytics
rebuilds the trainer there from its class, arguments, model and callbacks), and every checkpoint stores them on its
model (yoloslim.utils.metadata), which Ultralytics' final strip keeps, so `resume=True` continues with the same
settings.
A sparsity run's best.pt is its latest epoch, not its fittest (see SparsityTrainer.validate).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from ultralytics.optim import MuSGD
from ultralytics.utils import LOGGER
from ultralytics.utils.torch_utils import unwrap_model

from yoloslim import graph
from yoloslim.config import SPARSITY_RECIPE, SparsityConfig
from yoloslim.models.train import ClassicTraining, plain_classic
from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.files import write_text_atomic
from yoloslim.utils.metadata import with_stage
from yoloslim.utils.plots import plot_gamma_history
from yoloslim.utils.training import SafeDetectionTrainer, resume_run, trainable_copy

GAMMA_HISTORY = "gamma_history.json"
GAMMA_PLOT = "gamma_distribution.png"
# |gamma| histogram bins: one bin for exact zeros, then log-spaced up to 10
_LOG_EDGES = np.concatenate([[0.0], np.logspace(-6, 1, 57)])
# a change in the zeroed channels' GFLOPs fraction smaller than this is no progress (results.csv keeps 6 digits)
STALL_TOLERANCE = 1e-4
# sr's rise at each stall: the penalty's step becomes three times the most that Adam's own step (about lr) can defend
STALL_FACTOR = 3.0


def prunable_batchnorms(model: nn.Module, include_head: bool = False) -> list[tuple[str, nn.BatchNorm2d]]:
    """The BatchNorms whose channels a prune can remove (yoloslim.graph): backbone and neck, plus the head's inner ones
    if asked. Others (attention's inner widths, the head's output side) are left alone: a penalty there only costs
    accuracy."""
    model = unwrap_model(model)
    head = f"model.{len(model.model) - 1}."
    return [(n, bn) for n, bn in graph.prunable_batchnorms(model) if include_head or not n.startswith(head)]


def batchnorms_named(model: nn.Module, names: list[str]) -> list[tuple[str, nn.BatchNorm2d]]:
    """The same BatchNorms in another copy of the model (the EMA), found by name without tracing it again."""
    modules = dict(unwrap_model(model).named_modules())
    return [(n, modules[n]) for n in names]


def zeroed_flops_fraction(model: nn.Module, config: SparsityConfig, imgsz: int) -> float:
    """The fraction of GFLOPs kept by pruning exactly the channels whose |gamma| is below config.zero_gamma."""
    from yoloslim.prune import PruneConfig, prune_model

    result = prune_model(
        unwrap_model(model),
        PruneConfig(
            threshold=config.zero_gamma,
            round_to=config.round_to,
            min_keep=config.min_keep,
            imgsz=imgsz,
            compensate=False,
        ),
    )
    return result.after["gflops"] / result.before["gflops"]


def shrunk(values: torch.Tensor, amount: float) -> torch.Tensor:
    """Every entry's magnitude shrunk by `amount`, stopping at zero (the L1 proximal step)."""
    return values.sign() * (values.abs() - amount).clamp_(min=0)


def soft_threshold_(weight: torch.Tensor, amount: float) -> None:
    """In place: shrink every entry's magnitude by `amount`, stopping at zero."""
    weight.copy_(shrunk(weight, amount))


def gamma_magnitudes(model: nn.Module, include_head: bool = False, names: list[str] | None = None) -> np.ndarray:
    """|gamma| of the prunable BatchNorms (or of those `names`), one array."""
    found = batchnorms_named(model, names) if names is not None else prunable_batchnorms(model, include_head)
    gammas = [bn.weight.detach().abs().flatten().float().cpu() for _, bn in found]
    return torch.cat(gammas).numpy() if gammas else np.zeros(0)


def gamma_summary(gammas: np.ndarray) -> dict[str, float]:
    """The per-epoch figures users read to choose a pruning threshold."""
    p10, p50, p90 = np.quantile(gammas, [0.1, 0.5, 0.9])
    return {
        "gamma/p10": float(p10),
        "gamma/p50": float(p50),
        "gamma/p90": float(p90),
        "gamma/below_1e-2": float((gammas < 1e-2).mean()),
        "gamma/below_1e-3": float((gammas < 1e-3).mean()),
    }


class SparsityCallback:
    """Carries the settings into DDP workers and sets the epoch's sr on the trainer at each epoch start."""

    def __init__(self, config: SparsityConfig):
        self.config = config

    def __call__(self, trainer) -> None:
        trainer.sr = trainer.epoch_sr()
        if self.config.targeted:
            trainer.select_targets()


class SparsityTrainer(SafeDetectionTrainer):
    """Ultralytics DetectionTrainer with the L1 penalty on BatchNorm gammas, gamma monitoring and atomic saves.

    Use as `YOLO(w).train(data=..., trainer=SparsityTrainer.with_config(SparsityConfig()))`; plain
    `trainer=SparsityTrainer` uses the default SparsityConfig (or the checkpoint's on resume).
    """

    def __init__(self, cfg=None, overrides=None, _callbacks=None, sparsity: SparsityConfig | None = None):
        from ultralytics.utils import DEFAULT_CFG

        super().__init__(cfg or DEFAULT_CFG, overrides, _callbacks)
        if self.args.freeze and not self.resume and (sparsity is None or sparsity.targeted):
            raise YoloslimError(
                "freeze= keeps gammas that the targeted penalty's plan (the prune's) would shrink; train without "
                "freeze, or add --no-targeted (frozen gammas then pay no penalty)"
            )
        carried = self._carried_callback()
        resumed = self._config_from_checkpoint() if self.resume else None
        if resumed and sparsity and sparsity != resumed:
            LOGGER.warning(f"Resume keeps the checkpoint's sparsity settings {resumed}, ignoring {sparsity}.")
        self.sparsity = resumed or (carried.config if carried else None) or sparsity or SparsityConfig()
        if carried:
            carried.config = self.sparsity
        else:
            self.add_callback("on_train_epoch_start", SparsityCallback(self.sparsity))
        self.sr = self.sparsity.sr_at(0, self.epochs)
        self._targets: dict[str, torch.Tensor] | None = None  # targeted: name -> channels to shrink, this epoch

    @classmethod
    def with_config(cls, config: SparsityConfig | None):
        """A trainer factory for `YOLO.train(trainer=...)` that uses `config` (None: the defaults, or on resume the
        checkpoint's settings)."""
        return partial(cls, sparsity=config)

    def _carried_callback(self) -> SparsityCallback | None:
        found = [c for c in self.callbacks["on_train_epoch_start"] if isinstance(c, SparsityCallback)]
        return found[0] if found else None

    def _config_from_checkpoint(self) -> SparsityConfig | None:
        saved = self.lineage().get("sparsity")
        if not saved:
            return None
        # settings that earlier releases stored and this one no longer has (the removed `weighting`) are dropped
        known = {f.name for f in dataclasses.fields(SparsityConfig)}
        # settings stored before targeted existed, or became the default, are a uniform run's
        return SparsityConfig(**{"targeted": False, **{k: v for k, v in saved.items() if k in known}})

    # -- the penalty -----------------------------------------------------------------------------------------------
    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        if name == "auto" and self.sparsity.targeted:
            # auto's AdamW branch, whose rate the targeted sr was measured at: past 10,000 iterations (some 5,000
            # images at this recipe's batch and nbs) auto picks MuSGD at 0.01, a penalty step five times larger
            iterations = min(iterations, 10_000)
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        named = [(n, bn) for n, bn in prunable_batchnorms(model, self.sparsity.include_head) if bn.weight.requires_grad]
        self._penalised_names = [name for name, _ in named]
        penalised = {id(bn.weight): name for name, bn in named}
        self._gamma_groups = [
            [(penalised[id(p)], p) for p in g["params"] if id(p) in penalised] for g in optimizer.param_groups
        ]
        # A post-step hook runs inside scaler.step() only when the optimizer really stepped, and before the EMA update.
        optimizer.register_step_post_hook(self._apply_sparsity)
        # MuSGD (Ultralytics' "auto" choice for long runs) steps 1-D parameters such as gammas by plain SGD; a targeted
        # run needs no split from the optimizer, the plan makes it
        splits = isinstance(optimizer, (torch.optim.SGD, MuSGD)) or self.sparsity.targeted
        if self.sparsity.sr > 0 and not splits:
            LOGGER.warning(
                f"Sparsity training with {type(optimizer).__name__}: it divides each gamma's loss gradient by its own "
                "scale, so gammas shrink together instead of splitting into kept and prunable ones; pass optimizer=SGD."
            )
        return optimizer

    @torch.no_grad()
    def _apply_sparsity(self, optimizer, args, kwargs) -> None:
        for group, gammas in zip(optimizer.param_groups, self._gamma_groups):
            amount = group["lr"] * self.sr
            if amount <= 0:
                continue
            for name, weight in gammas:
                if self._targets is None:
                    soft_threshold_(weight, amount)
                elif name in self._targets:
                    targets = self._targets[name]
                    weight[targets] = shrunk(weight[targets], amount)

    def select_targets(self) -> None:
        """Targeted sparsity: this epoch, only the channels that a prune to stop_at_flops would remove from the model
        as it stands pay the penalty. The choice is the later prune's own plan (bn criterion, its rounding and
        per-layer minimum), so the channels it keeps never shrink."""
        from yoloslim.prune import PruneConfig, planned_removals

        config = PruneConfig(
            target_flops=self.sparsity.stop_at_flops,
            round_to=self.sparsity.round_to,
            min_keep=self.sparsity.min_keep,
            imgsz=self.args.imgsz,
            compensate=False,
        )
        try:
            removals = planned_removals(unwrap_model(self.model), config)
        except YoloslimError as e:  # at the first epoch's start, before any step: nothing is lost
            raise YoloslimError(
                f"targeted sparsity aims at a prune to stop_at_flops {self.sparsity.stop_at_flops}, out of this "
                f"model's reach: {e}; or train with --no-targeted"
            ) from None
        penalised = set(self._penalised_names)
        device = next(self.model.parameters()).device
        self._targets = {
            name: torch.tensor(idxs, dtype=torch.long, device=device)
            for name, idxs in removals.items()
            if name in penalised
        }

    # -- monitoring ------------------------------------------------------------------------------------------------
    def save_metrics(self, metrics):
        gammas = gamma_magnitudes(self.ema.ema, names=self._penalised_names)
        targeted = {"sparsity/targeted": sum(len(t) for t in self._targets.values())} if self._targets else {}
        super().save_metrics(
            {**metrics, "sparsity/sr": self.sr, **targeted, **self._stop_check(), **gamma_summary(gammas)}
        )
        history = record_gamma_histogram(self.save_dir / GAMMA_HISTORY, self.epoch, self.sr, gammas)
        if self.args.plots:
            plot_gamma_history(history, self.save_dir / GAMMA_PLOT)

    def _stop_check(self) -> dict:
        """With stop_at_flops: measure what the zeroed channels are worth and, once enough, end the run after this
        epoch (Ultralytics saves it first); the figure goes into results.csv."""
        target = self.sparsity.stop_at_flops
        if target is None:
            return {}
        kept = zeroed_flops_fraction(self.ema.ema, self.sparsity, self.args.imgsz)
        if kept <= target:
            LOGGER.info(
                f"Sparsity: pruning the channels below |gamma| {self.sparsity.zero_gamma} keeps {kept:.3f} of the "
                f"GFLOPs (target {target}); ending the run after epoch {self.epoch + 1}."
            )
            self.stop = True
        elif self.epoch + 1 >= self.epochs:
            LOGGER.warning(
                f"Sparsity: the last epoch ended with the zeroed channels worth a prune to {kept:.3f} of the GFLOPs, "
                f"not {target}: a prune to {target} cuts live channels and loses accuracy until finetuned; train "
                "best.pt for more epochs with yoloslim train, or prune less."
            )
        return {"sparsity/zeroed_flops": kept}

    def epoch_sr(self) -> float:
        """This epoch's sr: the schedule's, times STALL_FACTOR for each stall so far of a targeted run under a constant
        penalty. Every DDP rank derives it from results.csv at the epoch start (rank 0 wrote the last row before the
        epoch-end broadcast); a row of this epoch or later from before an interruption is not history."""
        scheduled = self.sparsity.sr_at(self.epoch, self.epochs)
        if not (self.sparsity.targeted and self.sparsity.stall_epochs and self.sparsity.schedule == "constant"):
            return scheduled
        logged = self.read_results_csv()
        rows = zip(logged.get("epoch", []), logged.get("sparsity/zeroed_flops", []))
        stalls = count_stalls([kept for epoch, kept in rows if epoch <= self.epoch], self.sparsity.stall_epochs)
        sr = scheduled * STALL_FACTOR**stalls
        if stalls and sr != getattr(self, "sr", sr):
            LOGGER.warning(
                f"Sparsity: the zeroed channels have not grown for {self.sparsity.stall_epochs} epochs: the targets "
                f"left resist the penalty, so sr rises to {sr:g} from epoch {self.epoch + 1}."
            )
        return sr

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def get_model(self, cfg=None, weights=None, verbose=True):
        if isinstance(weights, nn.Module) and self.lineage().get("prune"):  # iterative slimming: keep the pruned widths
            return trainable_copy(weights, self.data["nc"])
        return super().get_model(cfg, weights, verbose)

    def validate(self):
        """Make every epoch the best, so best.pt is the latest epoch: the penalty changes the model each epoch, and
        the fittest epoch is often an early one whose gammas have not split yet, which pruning cannot use."""
        metrics, fitness = super().validate()
        if fitness is not None:
            self.best_fitness = fitness
        return metrics, fitness

    def checkpoint_extras(self) -> dict:
        """The settings, and the gamma history so reports can draw it from the checkpoint alone."""
        history = self.save_dir / GAMMA_HISTORY
        extras = with_stage(super().checkpoint_extras(), "sparsity", asdict(self.sparsity))
        if history.exists():
            extras["gamma_history"] = json.loads(history.read_text())
        return extras


class ClassicSparsityTrainer(ClassicTraining, SparsityTrainer):
    """SparsityTrainer for a model of the original YOLOv5 repository."""

    def _stop_check(self) -> dict:
        with plain_classic(self.ema.ema):  # measured by a prune, which traces the model
            return super()._stop_check()

    def select_targets(self) -> None:
        with plain_classic(unwrap_model(self.model)):  # chosen by a prune's plan, which traces the model
            super().select_targets()


def count_stalls(zeroed_flops: list[float], patience: int) -> int:
    """How often the zeroed channels' GFLOPs fraction, once below 1, went `patience` epochs without a new low."""
    stalls, best, since = 0, 1.0, 0
    for kept in zeroed_flops:
        if kept < best - STALL_TOLERANCE:
            best, since = kept, 0
        elif best < 1:
            since += 1
            if since == patience:
                stalls, since = stalls + 1, 0
    return stalls


def record_gamma_histogram(path: Path, epoch: int, sr: float, gammas: np.ndarray) -> dict:
    """Append this epoch's |gamma| histogram to the run's history (replacing entries a resume re-runs)."""
    history = json.loads(path.read_text()) if path.exists() else {"edges": _LOG_EDGES.tolist(), "epochs": []}
    history["epochs"] = [e for e in history["epochs"] if e["epoch"] < epoch]
    counts, _ = np.histogram(gammas, bins=np.append(_LOG_EDGES, np.inf))
    history["epochs"].append({"epoch": epoch, "sr": sr, "counts": counts.tolist(), **gamma_summary(gammas)})
    write_text_atomic(path, json.dumps(history))
    return history


def train_sparse(
    weights: str, config: SparsityConfig | None = None, data: str | None = None, resume: bool = False, **train_args
):
    """Sparsity-train `weights` (a detection .pt or model yaml); return Ultralytics' metrics. The API under
    `yoloslim train`: `train_args` (Ultralytics train arguments) override the recipe of `config`'s route
    (SparsityConfig.recipe); imgsz defaults to the checkpoint's own, as in Ultralytics. A checkpoint of the original
    YOLOv5 repository trains with the classic trainer (yoloslim.models.train), and the run's final files are in its
    format."""
    from ultralytics import YOLO

    from yoloslim.data import resolve_data
    from yoloslim.models.train import is_classic_checkpoint, train_classic
    from yoloslim.utils.checks import check_model_yaml, load_detection_checkpoint

    dataset = str(resolve_data(data)) if data is not None or not resume else None  # checked before any work
    if str(weights).endswith(".pt") and not resume:
        graph.check_unfused(load_detection_checkpoint(weights, classic=True)[0], "there are no gammas to penalise")
    elif not resume:
        check_model_yaml(weights)
    recipe = (config or SparsityConfig()).recipe()
    if is_classic_checkpoint(weights):
        trainer = ClassicSparsityTrainer.with_config(config)
        return train_classic(trainer, "sparsity", weights, dataset, resume, recipe, **train_args)
    trainer = SparsityTrainer.with_config(config)  # None: the checkpoint's settings on resume, else the defaults
    if resume:
        return resume_run(weights, trainer, "sparsity", dataset, **train_args)
    return YOLO(weights).train(data=dataset, trainer=trainer, **{**recipe.train_args(), **train_args})


__all__ = [
    "SparsityConfig",
    "SPARSITY_RECIPE",
    "SparsityTrainer",
    "ClassicSparsityTrainer",
    "SparsityCallback",
    "train_sparse",
    "prunable_batchnorms",
]
