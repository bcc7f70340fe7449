"""Pruning to a latency: which channels go, by importance per unit of predicted latency on the profiled target.

The latency table (yoloslim.profile) holds the ONNX graph's channel groups and a predictor of the latency of any plan
(a width per group) as a fraction of the unpruned model's. Here the torch groups (graph.py) are matched to the
table's groups, the target is turned into a predicted-latency budget, and a multiple-choice knapsack picks one width
per group, as HALP does: each group's options are the widths its guards and rounding allow, worth the summed scores of
the channels they keep (the best of each equal part), costing their predicted latency.

Matching: the ONNX export keeps torch's parameter names on the convolutions' weight initializers (BatchNorm folded
into `<conv>.weight`), so a torch group and a table group are the same when the convolutions producing their channels
carry the same names; their widths must agree too. A table made from another architecture (or an ONNX whose weights
were renamed) matches no group and is refused.

The knapsack: the predictor is bilinear in the widths (a convolution between two narrowed groups does the product of
their fractions of work), so a group's cost depends on its neighbours'. Costs are therefore linearised around the
current plan and the knapsack solved again from the plan it returned, a few times; the plan kept is the most valuable
one whose predicted latency meets the target, and if none does the last one is narrowed greedily (the step that loses
least score per unit of latency saved) until it does.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, List, Optional

import numpy as np
import torch

from yoloslim.config import PruneConfig
from yoloslim.graph import build_graph, group_out_convs, undeployed_modules
from yoloslim.profile import LatencyTable
from yoloslim.profile.plans import allowed_widths
from yoloslim.prune.plan import GroupPlan, keep_best
from yoloslim.utils.errors import YoloslimError

BINS = 2000  # resolution of the knapsack's latency budget
ITERATIONS = 6


def resolve_rounding(config: PruneConfig) -> PruneConfig:
    """round_to unset (only with a latency table): the table's best multiple."""
    if config.round_to is None:
        return replace(config, round_to=LatencyTable.load(config.latency_table).round_to)
    return config


def match_groups(model, graph, groups, table: LatencyTable, narrower: bool = False) -> List[Optional[str]]:
    """The table group root of each torch group, matched by the names of the convolutions producing its channels
    that the deployed model runs (None for a group the export drops whole, such as an end-to-end head's one-to-many
    branch).

    narrower: the model may be narrower than the table's (already pruned, or built at a smaller width multiple)."""
    names = {m: n for n, m in model.named_modules()}
    by_conv = {conv: g for g in table.groups for conv in g["convs"]}
    undeployed = undeployed_modules(model)
    matched = []
    for group in groups:
        convs = {f"{names[conv]}.weight" for conv, _, _ in group_out_convs(graph, group) if conv not in undeployed}
        if not convs:  # only in a branch the export drops: no latency of its own on the target
            matched.append(None)
            continue
        found = {by_conv[c]["root"] for c in convs if c in by_conv}
        entry = next((g for g in table.groups if g["root"] in found), None)
        if len(found) != 1 or set(entry["convs"]) != convs or not _fits(group.size, entry, narrower):
            raise YoloslimError(
                f"the latency table has no group matching {group.root} ({group.size} channels); profile this model "
                "(the same architecture at the same widths) with yoloslim profile"
            )
        matched.append(entry["root"])
    if len(set(matched) - {None}) != len(table.groups):
        raise YoloslimError("the latency table holds groups this model does not have; profile this model itself")
    return matched


def _fits(size: int, entry: dict, narrower: bool) -> bool:
    """Whether a torch group of `size` channels can be the table group `entry` (equal parts when it is split)."""
    full = entry["size"] * entry["sections"]
    return size == full or (narrower and 0 < size < full and size % entry["sections"] == 0)


def target_fraction(config: PruneConfig, table: LatencyTable) -> float:
    if config.target_latency is not None:
        return config.target_latency
    return 1e3 / config.target_fps / table.reference_ms


class _Options:
    """Per group: the widths allowed and what each keeps of the group's score."""

    def __init__(self, groups, scores: List[torch.Tensor], roots: List[Optional[str]], config: PruneConfig):
        self.roots = roots
        self.widths, self.values = [], []
        for group, s in zip(groups, scores):
            parts = group.parts or [list(range(len(s)))]
            size = len(parts[0])
            widths = allowed_widths(size, config.round_to, config.min_keep)
            ranked = [torch.sort(s[part].float(), descending=True).values.cumsum(0) for part in parts]
            self.widths.append(widths)
            self.values.append(np.array([sum(float(r[w - 1]) for r in ranked) for w in widths]))

    def plan(self, choice: List[int]) -> Dict[str, int]:
        return {root: widths[c] for root, widths, c in zip(self.roots, self.widths, choice) if root is not None}

    def value(self, choice: List[int]) -> float:
        return float(sum(v[c] for v, c in zip(self.values, choice)))


def _knapsack(costs: List[np.ndarray], values: List[np.ndarray], capacity: float) -> Optional[List[int]]:
    """One option per group, maximising the summed value with summed cost <= capacity (costs shifted to >= 0 and
    binned up, so a chosen set never exceeds the capacity); None if even the cheapest options exceed it."""
    floors = [c.min() for c in costs]
    room = capacity - sum(floors)
    if room < 0:
        return None
    step = max(room, 1e-12) / BINS
    best = np.full(BINS + 1, -np.inf)
    best[0] = 0.0
    picks = []
    for cost, value, floor in zip(costs, values, floors):
        bins = np.ceil((cost - floor) / step - 1e-9).astype(int)
        new = np.full(BINS + 1, -np.inf)
        pick = np.zeros(BINS + 1, dtype=int)
        for option, (b, v) in enumerate(zip(bins, value)):
            if b > BINS:
                continue
            shifted = np.full(BINS + 1, -np.inf)
            shifted[b:] = best[: BINS + 1 - b] + v
            better = shifted > new
            new[better], pick[better] = shifted[better], option
        best = new
        picks.append(pick)
    at = int(np.argmax(best))
    choice = []
    for cost, floor, pick in zip(reversed(costs), reversed(floors), reversed(picks)):
        option = int(pick[at])
        choice.append(option)
        at -= int(np.ceil((cost[option] - floor) / step - 1e-9))
    return choice[::-1]


def _narrow_greedily(options: _Options, choice: List[int], predict, target: float) -> List[int]:
    """Step down the group that loses least score per unit of predicted latency saved, until the target is met."""
    choice = list(choice)
    current = predict(options.plan(choice))
    while current > target:
        best, best_rate, best_latency = None, math.inf, current
        for g, c in enumerate(choice):
            if c == 0:
                continue
            trial = choice[:g] + [c - 1] + choice[g + 1 :]
            latency = predict(options.plan(trial))
            saved = current - latency
            if saved <= 0:
                continue
            rate = (options.values[g][c] - options.values[g][c - 1]) / saved
            if rate < best_rate:
                best, best_rate, best_latency = g, rate, latency
        if best is None:
            break
        choice[best] -= 1
        current = best_latency
    return choice


def choose_widths(options: _Options, predict, target: float) -> List[int]:
    """The knapsack's choice of one width per group (indices into options.widths), meeting `target`."""
    choice = [len(w) - 1 for w in options.widths]
    found = []
    for _ in range(ITERATIONS):
        base_plan = options.plan(choice)
        base = predict(base_plan)
        costs = []
        for g, widths in enumerate(options.widths):
            root = options.roots[g]
            if root is None:  # not deployed: free, so the knapsack keeps it whole
                costs.append(np.zeros(len(widths)))
                continue
            costs.append(np.array([predict({**base_plan, root: w}) - base for w in widths]))
        picked = _knapsack(costs, options.values, target - base)
        if picked is None or picked == choice:
            break
        choice = picked
        if predict(options.plan(choice)) <= target:
            found.append(choice)
    if found:
        return max(found, key=options.value)
    return _narrow_greedily(options, choice, predict, target)


def plan_for_latency(model, graph, groups, scores, config: PruneConfig) -> tuple:
    """(plans, prediction) for a latency target: the knapsack's widths, each group keeping its best channels."""
    table = LatencyTable.load(config.latency_table)
    roots = match_groups(model, graph, groups, table)
    predictor = table.predictor
    target = target_fraction(config, table)
    if config.target_fps is not None and target >= 1:  # PruneConfig bounds target_latency; the FPS form only here
        raise YoloslimError(
            f"target_fps {config.target_fps:g} is already met: the unpruned model runs at "
            f"{1e3 / table.reference_ms:.1f} FPS on {table.describe()}; ask for more FPS"
        )
    options = _Options(groups, scores, roots, config)
    lowest = predictor(options.plan([0] * len(groups)))
    if lowest > target:
        raise YoloslimError(_unreachable(config, table, lowest))
    choice = choose_widths(options, predictor, target)
    plans = [keep_best(group, s, widths[c]) for group, s, widths, c in zip(groups, scores, options.widths, choice)]
    return plans, {"target": round(target, 4), **_prediction(groups, plans, roots, table)}


def _unreachable(config: PruneConfig, table: LatencyTable, lowest: float) -> str:
    guards = f"min_keep {config.min_keep} and round_to {config.round_to}"
    if config.target_fps is not None:
        fps = 1e3 / (lowest * table.reference_ms)
        return (
            f"target_fps {config.target_fps:g} cannot be reached on {table.describe()} with {guards}: the fastest "
            f"reachable model is predicted at {math.floor(fps * 10) / 10:.1f} FPS; ask for that or lower the guards"
        )
    return (
        f"target_latency {config.target_latency:g} cannot be reached on {table.describe()} with {guards}: the fastest "
        f"reachable model is predicted at {math.ceil(lowest * 1000) / 1000:.3f} of the unpruned latency; ask for "
        "that or lower the guards"
    )


def predicted_latency(model, graph, groups, plans: List[GroupPlan], config: PruneConfig) -> dict:
    """What the latency table predicts for a plan made by another amount (target_flops, ratio, threshold)."""
    table = LatencyTable.load(config.latency_table)
    return _prediction(groups, plans, match_groups(model, graph, groups, table), table)


def model_latency(model, table: LatencyTable) -> dict:
    """What the table predicts for `model` as it is: the table's architecture at its own widths or narrower (a prune
    made by another tool, or the same layout built at a smaller width multiple)."""
    graph, groups = build_graph(model)
    roots = match_groups(model, graph, groups, table, narrower=True)
    sections = {g["root"]: g["sections"] for g in table.groups}
    widths = {root: group.size // sections[root] for group, root in zip(groups, roots) if root is not None}
    return _predicted_widths(widths, table)


def _prediction(groups, plans: List[GroupPlan], roots: List[Optional[str]], table: LatencyTable) -> dict:
    """What the table predicts for a plan: fraction of the unpruned latency, milliseconds and FPS."""
    widths = {
        root: len(plan.keep) // max(len(group.parts), 1)
        for group, plan, root in zip(groups, plans, roots)
        if root is not None
    }
    return _predicted_widths(widths, table)


def _predicted_widths(widths: Dict[str, int], table: LatencyTable) -> dict:
    fraction = table.predictor(widths)
    ms = fraction * table.reference_ms
    return {
        "table": table.describe(),
        "table_error": round(table.check_error, 4),
        "table_fastest": round(table.fastest_measured, 4),
        "predicted": round(fraction, 4),
        "predicted_ms": round(ms, 3),
        "predicted_fps": round(1e3 / ms, 1),
        "unpruned_ms": round(table.reference_ms, 3),
    }


def measure_pruned(weights, pruned, config: PruneConfig) -> dict:
    """The pruned checkpoint's latency measured against the unpruned one, interleaved, when this machine is the
    table's target (ONNX Runtime on the same CPU): both exported to ONNX at the table's image size."""
    import tempfile
    from pathlib import Path

    from yoloslim.export.onnx import export_onnx
    from yoloslim.profile.timing import paired_ratio
    from yoloslim.runtime.backends import OnnxRuntimeBackend
    from yoloslim.utils.machine import cpu_name, cpu_vector_isa
    from yoloslim.utils.timing import compare_latency

    table = LatencyTable.load(config.latency_table)
    settings, env = table.data["settings"], table.data["environment"]
    here = {"cpu": cpu_name(), "cpu_vector_isa": cpu_vector_isa()}
    # the check times FP32 exports: a table of another precision is measured where that precision is deployed
    if (
        settings["backend"] != "onnxruntime"
        or settings["precision"] != "fp32"
        or any(env.get(k) != v for k, v in here.items())
    ):
        return {"measured": None, "measured_on": f"not measured here: the table is of {table.describe()}"}
    imgsz, threads = settings["imgsz"], settings["threads"]
    with tempfile.TemporaryDirectory(prefix="yoloslim-latency-") as work:
        models = {}
        for name, path in (("unpruned", weights), ("pruned", pruned)):
            onnx_path = export_onnx(path, imgsz=imgsz, out=Path(work) / f"{name}.onnx")
            models[name] = OnnxRuntimeBackend(str(onnx_path), threads=threads)
        x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
        timed = compare_latency({name: (lambda b=b: b(x)) for name, b in models.items()}, rounds=20, per_round=5)
    return {
        "measured": round(paired_ratio(timed["pruned"], timed["unpruned"]), 4),
        "measured_ms": round(timed["pruned"].p50_ms, 3),
        "measured_unpruned_ms": round(timed["unpruned"].p50_ms, 3),
        "measured_on": f"onnxruntime, {threads} threads, {imgsz} px on {cpu_name()}",
    }


def latency_lines(latency: dict) -> List[str]:
    """The latency part of the prune report."""
    lines = [f"latency on {latency['table']} (unpruned {latency['unpruned_ms']:.2f} ms):"]
    if "target" in latency:
        lines.append(f"- target: {latency['target']:.3f} of the unpruned latency")
    lines.append(
        f"- predicted: {latency['predicted']:.3f} ({latency['predicted_ms']:.2f} ms, "
        f"{latency['predicted_fps']:.1f} FPS)"
    )
    if latency.get("measured") is not None:
        lines.append(
            f"- measured: {latency['measured']:.3f} of the unpruned model timed interleaved with it "
            f"({latency['measured_ms']:.2f} against {latency['measured_unpruned_ms']:.2f} ms; {latency['measured_on']})"
        )
    elif "measured_on" in latency:
        lines.append(f"- measured: {latency['measured_on']}")
    return lines + [f"- warning: {w}" for w in latency_warnings(latency)]


def latency_warnings(latency: dict) -> List[str]:
    """What makes a latency prune's figures doubtful: a table that missed its own check, a prediction below every
    variant the table measured, a measurement that misses the target by more than the table's error (or 5 %)."""
    from yoloslim.profile import MAX_PREDICTOR_ERROR, UNRELIABLE_TABLE

    warnings = []
    error = latency.get("table_error", 0.0)  # absent from reports of earlier versions
    if error > MAX_PREDICTOR_ERROR:
        warnings.append(UNRELIABLE_TABLE.removeprefix("warning: ").format(error=100 * error))
    if latency["predicted"] < latency.get("table_fastest", 0.0):
        warnings.append(
            f"the prediction {latency['predicted']:.3f} lies below the fastest variant the table measured "
            f"({latency['table_fastest']:.3f}): it extrapolates; keep --round-to at the table's multiple or larger"
        )
    measured, target = latency.get("measured"), latency.get("target")
    if measured is not None and target is not None and measured > target * (1 + max(error, 0.05)):
        warnings.append(
            f"measured {measured:.3f} misses the target {target:.3f} by more than the table's error; profile again "
            "on a quiet machine, or aim lower"
        )
    return warnings


def append_latency_report(result) -> None:
    """Add the latency lines to the written prune report."""
    from yoloslim.utils.files import write_text_atomic

    text = result.report.read_text()
    write_text_atomic(result.report, text + "\n## Latency\n\n" + "\n".join(latency_lines(result.latency)) + "\n")
