"""Channel pruning of YOLO detectors: `prune()` is the API under `yoloslim prune`.

graph.py says what is coupled, importance.py what matters, plan.py which channels go, apply.py removes them (with
bias compensation), report.py shows the result. The output is a checkpoint in its input's format: an ordinary
Ultralytics checkpoint, or for the original YOLOv5 repository's anchor-based models one that repository's own tools
load (yoloslim.models.save).
"""

from __future__ import annotations

import hashlib
import math
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from yoloslim.graph import build_graph, check_unfused, conv_widths, model_stats
from yoloslim.models.save import original_names, save_original_format
from yoloslim.models.yolo import DetectionModel as ClassicDetectionModel
from yoloslim.prune.apply import apply_plan, removed_batchnorm_channels
from yoloslim.prune.importance import IMPORTANCES
from yoloslim.prune.plan import (
    GroupPlan,
    PruneConfig,
    above_ratio,
    above_threshold,
    cut_score,
    plan_groups,
    removed_fraction,
)
from yoloslim.utils.assets import is_shipped
from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.files import atomic_path, output_path
from yoloslim.utils.metadata import checkpoint_metadata, set_checkpoint_metadata

__all__ = ["PruneConfig", "PruneResult", "prune", "prune_model", "plan_pruning", "planned_removals"]


@dataclass
class PruneResult:
    """What pruning did: the model and the figures of its report."""

    model: nn.Module
    config: PruneConfig
    threshold: float
    removed_fraction: float  # of prunable channels, after rounding
    before: dict  # params, gflops
    after: dict
    widths: dict  # conv name -> [channels before, after]
    scores: list = field(repr=False, default_factory=list)  # per-group channel scores (for the histogram)
    out: Path | None = None  # the checkpoint written, and its report (None for a dry run)
    report: Path | None = None
    latency: dict | None = None  # predicted (and measured) latency on a profiled target, with a latency table

    def metadata(self, source: Path) -> dict:
        """Plain-typed prune metadata stored in the checkpoint (readable with ULTRALYTICS_SAFE_LOAD=1)."""
        return {
            "source": str(source),
            "source_sha256": file_sha256(source),
            "date": datetime.now(timezone.utc).isoformat(),
            "settings": asdict(self.config),
            "threshold": self.threshold,
            "removed_fraction": self.removed_fraction,
            "before": self.before,
            "after": self.after,
            "widths": self.widths,
            **({"latency": self.latency} if self.latency else {}),
        }


@dataclass
class Planned:
    """A model's dependency graph, its channel groups, their scores and the plan for each."""

    graph: object
    groups: list
    scores: list
    threshold: float
    plans: list[GroupPlan]
    latency: dict | None = None


def plan_pruning(model: nn.Module, config: PruneConfig, gflops: float | None = None) -> Planned:
    """Score every channel group of `model` and decide, per group, which channels stay."""
    if config.method == "bn":
        check_unfused(model, "it has no gammas to rank channels by", ", or prune by filter norm with --method l1")
    graph, groups = build_graph(model)
    importance = IMPORTANCES[config.method]
    scores = [importance(graph, g) for g in groups]
    if config.target_latency is not None or config.target_fps is not None:
        return _plan_for_latency(model, graph, groups, scores, config)
    if config.ratio is not None:
        threshold, above = cut_score(scores, config.ratio), above_ratio(scores, config.ratio)
    else:
        if config.threshold is not None:
            threshold = config.threshold
        else:
            gflops = gflops if gflops is not None else model_stats(model, config.imgsz)["gflops"]
            threshold = _threshold_for_flops(model, [g.root for g in groups], scores, config, gflops)
        above = above_threshold(scores, threshold)
    plans = plan_groups(groups, scores, above, config)
    return Planned(graph, groups, scores, threshold, plans, _predicted_latency(model, graph, groups, plans, config))


def planned_removals(model: nn.Module, config: PruneConfig) -> dict[str, list[int]]:
    """The BatchNorm channels (by module name, coupled ones included) that pruning `model` with `config` would remove;
    `model` is left alone."""
    from yoloslim.prune.latency import resolve_rounding

    model = deepcopy(model).float().cpu().eval()
    planned = plan_pruning(model, resolve_rounding(config))
    names = {module: name for name, module in model.named_modules()}
    removed = removed_batchnorm_channels(planned.graph, planned.groups, planned.plans)
    return {names[bn]: sorted(set(idxs)) for bn, idxs in removed.items() if idxs}


def _plan_for_latency(model, graph, groups, scores, config) -> Planned:
    """The knapsack's plan for a latency target (prune/latency.py); no single threshold cuts it."""
    from yoloslim.prune.latency import plan_for_latency

    plans, latency = plan_for_latency(model, graph, groups, scores, config)
    return Planned(graph, groups, scores, -math.inf, plans, latency)


def _predicted_latency(model, graph, groups, plans, config) -> dict | None:
    """With a latency table, what it predicts for a plan made by another amount."""
    if config.latency_table is None:
        return None
    from yoloslim.prune.latency import predicted_latency

    return predicted_latency(model, graph, groups, plans, config)


def prune_model(model: nn.Module, config: PruneConfig) -> PruneResult:
    """Prune a float32 detection model (a copy is pruned; `model` is left alone)."""
    from yoloslim.prune.latency import resolve_rounding

    config = resolve_rounding(config)
    model = deepcopy(model).float().cpu().eval()
    before_widths = conv_widths(model)
    before = model_stats(model, config.imgsz)
    planned = plan_pruning(model, config, before["gflops"])
    apply_plan(model, planned.graph, planned.groups, planned.plans, config.compensate)
    after_widths = conv_widths(model)
    return PruneResult(
        model=model,
        config=config,
        threshold=planned.threshold,
        removed_fraction=removed_fraction(planned.plans),
        before=before,
        after=model_stats(model, config.imgsz),
        widths={k: [before_widths[k], after_widths[k]] for k in before_widths},
        scores=[s.tolist() for s in planned.scores],
        latency=planned.latency,
    )


def _gflops_with(model, roots, scores, threshold, config) -> float:
    trial = deepcopy(model)
    graph, groups = build_graph(trial)
    if [g.root for g in groups] != roots:  # the plans are matched to the groups by position
        raise RuntimeError("the dependency graph of a copy traced its channel groups in another order")
    plans = plan_groups(groups, scores, above_threshold(scores, threshold), config)
    apply_plan(trial, graph, groups, plans, compensate=False)
    return model_stats(trial, config.imgsz)["gflops"]


def _threshold_for_flops(model, roots, scores, config, gflops: float) -> float:
    """Smallest global threshold whose pruned model fits the GFLOPs budget (bisection over the sorted scores)."""
    if gflops <= 0:
        raise YoloslimError(
            f"Ultralytics could not count this model's GFLOPs at imgsz {config.imgsz}, so target_flops "
            "has nothing to aim at; use ratio or threshold, or check that ultralytics-thop is installed"
        )
    budget = config.target_flops * gflops
    candidates = torch.unique(torch.cat(scores)).tolist() + [math.inf]
    lowest = _gflops_with(model, roots, scores, math.inf, config)
    if lowest > budget:
        raise YoloslimError(
            f"target_flops cannot be reached with min_keep {config.min_keep} and round_to {config.round_to}: the "
            f"smallest reachable model keeps {math.ceil(lowest / gflops * 1000) / 1000:.3f} of the GFLOPs; ask for "
            "that or lower the guards"
        )
    lo, hi = 0, len(candidates) - 1  # invariant: candidates[hi] fits the budget
    while lo < hi:
        mid = (lo + hi) // 2
        if _gflops_with(model, roots, scores, candidates[mid], config) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return candidates[hi]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_output(weights: Path) -> Path:
    """`<weights>-pruned.pt` beside the input, or under runs/prune/ for the shipped weights; never an existing file."""
    from ultralytics.utils.files import increment_path

    folder = Path("runs") / "prune" if is_shipped(weights) else weights.parent
    return Path(increment_path(folder / f"{weights.stem}-pruned.pt", sep=""))


def prune(
    weights: str | Path, config: PruneConfig | None = None, out: str | Path | None = None, dry_run: bool = False
) -> PruneResult:
    """Prune a checkpoint; unless dry_run, write it in the input's format (Ultralytics', or the original YOLOv5
    repository's) and its report beside it."""
    from yoloslim.prune.report import write_prune_report
    from yoloslim.utils.checks import load_detection_checkpoint

    config = config or PruneConfig()
    weights = Path(weights)
    model, ckpt = load_detection_checkpoint(weights, classic=True)
    if not dry_run:
        out = output_path(out, default_output(weights), weights)
        if out.suffix != ".pt":  # Ultralytics loads checkpoints by their suffix
            raise YoloslimError(f"out {out} must end in .pt so that YOLO() and yoloslim finetune can load it")
    result = prune_model(model, config)
    if dry_run:
        return result
    if isinstance(model, ClassicDetectionModel):
        metadata = yoloslim_metadata(result, ckpt, weights)
        save_original_format(result.model, ckpt, out, original_names(weights), metadata)
    else:
        save_pruned_checkpoint(result, ckpt, weights, out)
    result.out = out
    if result.latency:
        from yoloslim.prune.latency import measure_pruned

        result.latency.update(measure_pruned(weights, out, config))
    result.report = write_prune_report(result)
    if result.latency:
        from yoloslim.prune.latency import append_latency_report

        append_latency_report(result)
    return result


def yoloslim_metadata(result: PruneResult, ckpt: dict, source: Path) -> dict:
    """The checkpoint's yoloslim metadata: this prune under "prune", an earlier one's moved to "earlier_prunes"."""
    previous = checkpoint_metadata(ckpt)
    if "prune" in previous:  # pruning a pruned model: keep the history, latest under "prune"
        previous["earlier_prunes"] = [*previous.get("earlier_prunes", []), previous.pop("prune")]
    return {**previous, "prune": result.metadata(source)}


def save_pruned_checkpoint(result: PruneResult, ckpt: dict, source: Path, out: Path) -> None:
    from ultralytics import __version__

    model = deepcopy(result.model).half()
    for p in model.parameters():
        p.requires_grad_(False)
    model.args = dict(getattr(model, "args", {}) or {})
    carried = {k: ckpt.get(k) for k in ("train_args", "license", "docs") if k in ckpt}
    payload = {
        **carried,
        "date": datetime.now().astimezone().isoformat(),
        "version": __version__,
        "epoch": -1,
        "best_fitness": None,
        "model": model,
        "ema": None,
        "updates": None,
        "optimizer": None,
    }
    set_checkpoint_metadata(model, yoloslim_metadata(result, ckpt, source))
    with atomic_path(out) as tmp:
        torch.save(payload, tmp)
