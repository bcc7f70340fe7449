"""Pruning benchmark: sparsity training once, pruning at several amounts, finetuning each, against an honest control.

    python tools/bench_prune.py                          # the shipped baseline on the embedded synthetic dataset
    python tools/bench_prune.py --weights <license-plate>/license_plate_yolov5nu.pt --data <license-plate>/data.yaml
    python tools/bench_prune.py --smoke                  # one tiny epoch per stage: checks the tool, not the model

`--weights` is the model a user brings (default: the shipped baseline) and `--data` its dataset (default: the
embedded synthetic dataset). Sparsity training, pruning and finetuning follow yoloslim's defaults (`yoloslim train
--help`, `yoloslim prune --help`, `yoloslim finetune --help`) unless an option here says otherwise; images are the
size the model was trained at unless `--imgsz` is given.

Every stage writes its output under runs/bench/prune/<weights name>/ (or --out) and is skipped when that output
exists; an interrupted training resumes from its last.pt. Run the same command again to continue, on this machine or
later. A stage's name carries whatever makes it differ (a control its epochs, a sparsity stage its sr and epochs, a
prune that stage's name, its amount and its guards, a finetune its prune's name and its epochs), so a run with other
settings reuses nothing it should not. Prunes of a checkpoint given with `--sparse` carry no stage name: before giving
another checkpoint, move the first one's prunes away.

For each point: params, GFLOPs (at imgsz), ONNX Runtime CPU latency at batch 1 measured in the same run as the
unpruned model (alternating, threads pinned and recorded), and mAP50-95 with its 95% bootstrap interval over
validation images: before pruning, right after pruning with and without bias compensation, and after finetuning; and
each point's change against the model it is judged by (pruned: the sparse model; finetuned: the control; sparse and
control: the base), with a paired bootstrap interval over the same images, much tighter than the two intervals apart.
The control is the unpruned model trained for the same extra epochs (sparsity + finetune) with the finetuning recipe.
A trained stage's point is its best.pt, which Ultralytics picks on the same validation images: that favours the
control, the best of many near-equal epochs on a flat curve, more than a finetune that is still rising, so it makes the
finetuning criterion stricter, not looser. The speed criterion's interval resamples the interleaved timing rounds.
Prunes are given as `--ratios` and/or `--target-flops` fractions, and/or `--target-latency` fractions of the unpruned
model's latency with the `--latency-table` that `yoloslim profile` made of it, with `--min-keep` and `--round-to` as in
`yoloslim prune`. `--method l1` skips sparsity training: it prunes the base by filter L1 norm and finetunes for the
control's whole budget, the alternative a user weighs against Network Slimming at the same epochs.
`--distill 0.5` adds a second finetune of that ratio distilled from the unpruned base model (the model the user brings;
a short, strong sparsity run can leave the sparse model weaker than it), to measure what distillation buys at the same
epochs; `--distill-teacher base control` also distills from the control, a teacher trained as long as the student;
`--distill-weight 0.5` sets Ultralytics' distillation loss weight (`dis`, 6.0 by default).
`--recipe lr0=0.001` sets Ultralytics train arguments over the finetuning recipe, for the finetunes and the
control alike, and for the sparsity stage where its recipe does not set them; it names their stages by them. The
six-class synthetic runs in docs/benchmarks.md finetune with that baseline's last training cycle, `--recipe
optimizer=SGD lr0=0.005 batch=8 nbs=8`, so that their control continues the baseline's own curve.
`--lane control` trains only the control and `--lane pruned` the sparsity stage and every finetune, and neither
measures: on a machine with a core per lane, run both at once (each trains on one core), then the command without
`--lane` finds those stages done, trains what needs both (`--extra-cycle`) and measures on a quiet machine.
`--extra-cycle 30` trains the control and every finetuned model once more, 30 epochs each from its best.pt with a fresh
learning-rate schedule, and judges each `-plus30` finetune against `control-plus30`: both sides get the same epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from yoloslim.config import (  # noqa: E402
    DEFAULT_TARGET_FLOPS,
    FINETUNE_RECIPE,
    SCHEDULES,
    SPARSITY_RECIPE,
    TARGETED_SR,
    UNIFORM_SPARSITY_RECIPE,
    UNIFORM_SR,
    PruneConfig,
    SparsityConfig,
    route_sr,
)
from yoloslim.utils.assets import BASELINE, shipped_file  # noqa: E402
from yoloslim.utils.files import write_text_atomic  # noqa: E402

# Settings of every trained stage that keep runs comparable: one data loader process and one seed, so a rerun on the
# same machine repeats exactly, and the mosaic closed for the last 5 epochs, as in every run recorded in
# docs/benchmarks.md.
COMMON = dict(workers=0, seed=0, close_mosaic=5, plots=True)
# The measured recipes (yoloslim/config.py): the Ultralytics train arguments of each stage, the epochs being the tool's
# own options. A targeted sparsity stage trains with the finetune's (SPARSITY_RECIPE), a uniform one with SGD's.
SGD_TRAIN = {k: v for k, v in UNIFORM_SPARSITY_RECIPE.train_args().items() if k != "epochs"}
FINETUNE_TRAIN = {k: v for k, v in FINETUNE_RECIPE.train_args().items() if k != "epochs"}
DEFAULT_SPARSITY = SparsityConfig()
DEFAULT_PRUNE = PruneConfig()
MAP_ALLOWANCE = 0.01  # one mAP50-95 point, the most a prune or a finetune may lose against its reference
# Rounds of compare_latency (5 calls of each model per round): the speed criterion's interval resamples them.
LATENCY_ROUNDS = 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help=f"the unpruned model (default: the shipped {BASELINE})")
    parser.add_argument("--data", type=Path, help="its dataset yaml (default: the embedded synthetic dataset)")
    parser.add_argument("--imgsz", type=int, help="image size (default: the one the model was trained at)")
    parser.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        help=f"fractions of prunable channels to remove (without --ratios and --target-flops: --target-flops "
        f"{DEFAULT_TARGET_FLOPS})",
    )
    parser.add_argument(
        "--target-flops",
        type=float,
        nargs="+",
        default=[],
        metavar="FRACTION",
        help="also prune to these fractions of the original GFLOPs (points pruned-flops<FRACTION>)",
    )
    parser.add_argument(
        "--target-latency",
        type=float,
        nargs="+",
        default=[],
        metavar="FRACTION",
        help="also prune to these fractions of the unpruned model's latency on the target of --latency-table "
        "(points pruned-lat<FRACTION>)",
    )
    parser.add_argument(
        "--latency-table",
        help="yoloslim profile's latency table of the base model, for --target-latency (made on the CPU that times "
        "the points)",
    )
    parser.add_argument(
        "--min-keep",
        type=float,
        default=DEFAULT_PRUNE.min_keep,
        help="per-layer minimum fraction of channels kept (see yoloslim prune --min-keep)",
    )
    parser.add_argument(
        "--sr",
        type=float,
        help=f"sparsity strength (see yoloslim train --sr; default {TARGETED_SR} targeted, {UNIFORM_SR} uniform)",
    )
    parser.add_argument(
        "--sr-schedule",
        choices=SCHEDULES,
        default=DEFAULT_SPARSITY.schedule,
        help="how sr decays over the sparsity epochs (to zero at the last for linear and cosine)",
    )
    parser.add_argument(
        "--targeted",
        action=argparse.BooleanOptionalAction,
        default=DEFAULT_SPARSITY.targeted,
        help="penalise only the channels the prune to --stop-at-flops would remove (see yoloslim train --targeted; "
        "stages -targeted); --no-targeted: every prunable gamma",
    )
    parser.add_argument(
        "--sparse-recipe",
        choices=("sgd", "finetune"),
        help="the sparsity stage's train recipe: the finetune's optimizer and batch, which the control trains with "
        "(stages -ftrecipe; the penalty still steps every batch, nbs 8), or the uniform penalty's SGD one (default: "
        "the route's, as in yoloslim train)",
    )
    parser.add_argument(
        "--method",
        choices=("bn", "l1"),
        default="bn",
        help="bn: prune the sparsity-trained model by BatchNorm |gamma|; l1: prune the base by filter L1 "
        "norm, no sparsity stage, and finetune it for the control's whole budget (sparse + finetune "
        "epochs; points named l1-*)",
    )
    parser.add_argument(
        "--sparse",
        type=Path,
        help="use this sparsity-trained checkpoint (trained from the same base with "
        "the recipe below) instead of training one; its epochs are the rows of its run's results.csv, "
        "or --sparse-epochs without one",
    )
    parser.add_argument("--sparse-epochs", type=int, default=SPARSITY_RECIPE.epochs)
    parser.add_argument(
        "--stop-at-flops",
        type=_fraction_or_none,
        default=DEFAULT_SPARSITY.stop_at_flops,
        metavar="FRACTION|none",
        help="end the sparsity stage once pruning its channels with |gamma| < 0.01 (at --round-to) keeps "
        "at most this fraction of the GFLOPs; the finetune gets the epochs it leaves (stages -stop<F>); "
        f"none trains every --sparse-epochs (default {DEFAULT_SPARSITY.stop_at_flops})",
    )
    parser.add_argument(
        "--stall-epochs",
        type=int,
        default=DEFAULT_SPARSITY.stall_epochs,
        help="targeted, constant sr: sr triples after this many epochs without new zeroed channels (see yoloslim "
        f"train --stall-epochs; stages -stall<N> when not the default {DEFAULT_SPARSITY.stall_epochs}; 0: sr fixed)",
    )
    parser.add_argument("--finetune-epochs", type=int, default=FINETUNE_RECIPE.epochs)
    parser.add_argument(
        "--round-to",
        type=int,
        default=DEFAULT_PRUNE.round_to,
        help="kept widths are multiples of this (see yoloslim prune --round-to); 16 suits ONNX Runtime on "
        "AVX-512 CPUs, whose NCHWc convolution kernels take channels in blocks of 16",
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=sorted({1, os.cpu_count() or 1}),
        help="ONNX Runtime thread counts to time latency at, each pinned in its own interleaved pass",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny data, imgsz 64, one epoch per stage")
    parser.add_argument(
        "--skip-finetune", action="store_true", help="stop after pruning: base, sparse and pruned points only"
    )
    parser.add_argument(
        "--distill",
        type=float,
        nargs="*",
        metavar="AMOUNT",
        help="also finetune the prunes of these ratios or --target-flops fractions (all prunes if none "
        "given) with an unpruned teacher (Ultralytics distill_model)",
    )
    parser.add_argument(
        "--distill-weight",
        type=float,
        metavar="DIS",
        help="Ultralytics' distillation loss weight dis for --distill (default: Ultralytics', 6.0); "
        "points named -dis<DIS>",
    )
    parser.add_argument(
        "--distill-teacher",
        nargs="+",
        choices=("base", "control"),
        default=["base"],
        help="the teachers for --distill: the base model, and/or the control (needs finetuning on)",
    )
    parser.add_argument(
        "--extra-cycle",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="a second training cycle of this many epochs for the control and every finetuned model",
    )
    parser.add_argument(
        "--recipe",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        dest="recipe_changes",
        help="Ultralytics train arguments over the model's finetuning recipe, for the finetunes and the "
        "control alike, and the sparsity stage where its recipe does not set them (e.g. lr0=0.001); their stages are "
        "named by them",
    )
    parser.add_argument(
        "--lane",
        choices=("control", "pruned"),
        help="train only the control, or only the other stages, and measure nothing (run both lanes at once)",
    )
    parser.add_argument(
        "--name", default="results", help="write the results to NAME.json and NAME.md in the run folder"
    )
    parser.add_argument(
        "--out", type=Path, help="the run folder (default: runs/bench/prune/<weights name>, -smoke with --smoke)"
    )
    args = parser.parse_args()
    if args.method == "l1" and args.sparse:
        parser.error("--sparse is for --method bn: --method l1 prunes the base model and trains no sparse one")
    if args.lane and args.skip_finetune:
        parser.error(
            "--lane splits the training between the control and the finetunes: --skip-finetune trains no control"
        )
    if args.lane and args.distill is not None and "control" in args.distill_teacher:
        parser.error(
            "--distill-teacher control needs the trained control: train the control lane first, then run without --lane"
        )
    if args.target_latency and not args.latency_table:
        parser.error("--target-latency needs --latency-table: make one with yoloslim profile --weights <base>")
    if not args.ratios and not args.target_flops and not args.target_latency:
        args.target_flops = [DEFAULT_TARGET_FLOPS]
    args.ratios = args.ratios or []
    if args.targeted and args.stop_at_flops is None and args.method == "bn":
        parser.error("a targeted stage aims at its prune to --stop-at-flops: give a fraction, or add --no-targeted")
    args.sr = route_sr(args.targeted) if args.sr is None else args.sr
    args.sparse_recipe = args.sparse_recipe or ("finetune" if args.targeted else "sgd")

    from yoloslim.cli import parse_overrides
    from yoloslim.data import resolve_data
    from yoloslim.utils.machine import cpu_name, cpu_vector_isa

    base = args.weights or shipped_file("weights", BASELINE)
    changed = parse_overrides(args.recipe_changes, allow=("batch",))  # the tool has no --batch
    recipe = {**COMMON, "imgsz": args.imgsz or _trained_imgsz(base), **FINETUNE_TRAIN, **changed}
    recipe_tag = _recipe_tag(changed)
    data = resolve_data(args.data)
    out = args.out or ROOT / "runs" / "bench" / "prune" / (base.stem + ("-smoke" if args.smoke else ""))
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        data, recipe["imgsz"], recipe["batch"] = _smoke_data(out, base), 64, 4
        args.sparse_epochs = args.finetune_epochs = 1
    recipe["project"] = str(out)
    imgsz = recipe["imgsz"]

    points = {"base": base}
    control_epochs = args.sparse_epochs + args.finetune_epochs
    trains_control = not args.skip_finetune and args.lane != "pruned"
    control = (
        _train(out, f"control-e{control_epochs}{recipe_tag}", base, data, recipe, control_epochs)
        if trains_control
        else None
    )
    if args.lane == "control":
        return
    sparse_tag = _sparse_tag(args)
    if sparse_tag:  # a stage trained with other --recipe changes is another stage, and so are its prunes
        sparse_tag += _recipe_tag(_sparse_changes(changed, args.sparse_recipe))
    if args.method == "bn":
        sparsity = dataclasses.replace(
            DEFAULT_SPARSITY,
            sr=args.sr,
            schedule=args.sr_schedule,
            stop_at_flops=args.stop_at_flops,
            round_to=args.round_to,
            min_keep=args.min_keep,
            targeted=args.targeted,
            stall_epochs=args.stall_epochs,
        )
        sparse_recipe = {**recipe, **(SGD_TRAIN if args.sparse_recipe == "sgd" else {})}
        points["sparse"] = args.sparse or _train(
            out, f"sparse-{sparse_tag}", base, data, sparse_recipe, args.sparse_epochs, sparsity=sparsity
        )
    source = points.get("sparse", base)
    # the control's budget is fixed; whatever the sparsity stage does not use (--method l1: all of it, --stop-at-flops:
    # the epochs after it stopped) goes to the finetune
    args.sparse_epochs_used = 0 if args.method == "l1" else _epochs_trained(points["sparse"], args.sparse_epochs)
    tune_epochs = args.finetune_epochs_used = args.finetune_epochs + args.sparse_epochs - args.sparse_epochs_used
    if control:
        points["control"] = control
    amounts = (
        [{"ratio": ratio} for ratio in args.ratios]
        + [{"target_flops": flops} for flops in args.target_flops]
        + [{"target_latency": latency, "latency_table": args.latency_table} for latency in args.target_latency]
    )
    for amount in amounts:
        config = PruneConfig(**amount, method=args.method, min_keep=args.min_keep, round_to=args.round_to, imgsz=imgsz)
        tag = "-".join(filter(None, (sparse_tag, _prune_tag(config))))
        for compensate in (True, False):
            points[f"pruned-{tag}" + ("" if compensate else "-nocomp")] = _prune(out, source, config, tag, compensate)
        if not args.skip_finetune:
            points[f"finetuned-{tag}"] = _train(
                out, f"finetune-{tag}-e{tune_epochs}{recipe_tag}", points[f"pruned-{tag}"], data, recipe, tune_epochs
            )
        for teacher in args.distill_teacher if not args.skip_finetune and _distilled(amount, args.distill) else ():
            suffix = ("" if teacher == "base" else f"-{teacher}") + (
                "" if args.distill_weight is None else f"-dis{args.distill_weight}"
            )
            weight = {} if args.distill_weight is None else {"dis": args.distill_weight}
            points[f"distilled-{tag}{suffix}"] = _train(
                out,
                f"distill-{tag}{suffix}-e{tune_epochs}{recipe_tag}",
                points[f"pruned-{tag}"],
                data,
                {**recipe, **weight},
                tune_epochs,
                teacher=points[teacher],
            )
    if args.lane == "pruned":
        return
    if args.extra_cycle and not args.skip_finetune:
        points.update(_extra_cycle(out, points, data, recipe, args.extra_cycle))

    results = _measure(out, points, data, imgsz, args.threads)
    results["settings"] = {
        **vars(args),
        "recipe": recipe,
        "sparsity": {
            **_sparse_train_args(args),
            "include_head": DEFAULT_SPARSITY.include_head,
            "targeted": args.targeted,
        },
        "weights": str(base),
        "data": str(data),
    }
    results["env"] = {
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "cpu": cpu_name(),
        "cpu_vector_isa": cpu_vector_isa(),
        "onnxruntime": __import__("onnxruntime").__version__,
        "onnxruntime_threads": args.threads,
        "machine": platform.machine(),
        "torch": __import__("torch").__version__,
        "ultralytics": __import__("ultralytics").__version__,
    }
    results["command"] = "python " + " ".join(
        [
            Path(sys.argv[0]).relative_to(ROOT).as_posix() if Path(sys.argv[0]).is_absolute() else sys.argv[0],
            *sys.argv[1:],
        ]
    )
    write_text_atomic(out / f"{args.name}.json", json.dumps(results, indent=2, default=str))
    write_text_atomic(out / f"{args.name}.md", _markdown(results))
    print(_markdown(results))


def _fraction_or_none(text: str) -> float | None:
    """--stop-at-flops: a fraction, or none to train every epoch."""
    return None if text.lower() == "none" else float(text)


def _trained_imgsz(weights: Path) -> int:
    """The image size the model was trained at, from its checkpoint's training arguments."""
    from yoloslim.utils.checks import load_detection_checkpoint, trained_imgsz
    from yoloslim.utils.errors import YoloslimError

    imgsz = trained_imgsz(load_detection_checkpoint(weights, classic=True)[1])
    if not isinstance(imgsz, int):
        raise YoloslimError(f"{weights} does not record the image size it was trained at; pass --imgsz")
    return imgsz


def _smoke_data(out: Path, weights: Path) -> Path:
    """A few tiny synthetic images with as many classes as the model has."""
    from yoloslim.data.synthetic import default_config, ensure_synthetic_dataset
    from yoloslim.utils.checks import load_detection_checkpoint

    config = default_config()
    nc = len(load_detection_checkpoint(weights, classic=True)[0].names)
    config = dataclasses.replace(
        config, image_size=96, object_size=(8, 48), splits={"train": 8, "val": 4}, classes=config.classes[:nc]
    )
    return ensure_synthetic_dataset(config, root=out / "data")


def _train(
    out: Path,
    name: str,
    weights: Path,
    data: Path,
    recipe: dict,
    epochs: int,
    sparsity: SparsityConfig | None = None,
    teacher: Path | None = None,
) -> Path:
    """Train (or resume) one stage; its best.pt is the stage's output."""
    from yoloslim.utils.training import resume_point

    run = out / name / "weights"
    if (out / name / "done").exists():
        return run / "best.pt"
    start = resume_point(run / "last.pt", weights)
    args = dict(recipe, name=name, epochs=epochs, exist_ok=True)
    if start and sparsity is not None:
        from yoloslim.sparsity import train_sparse

        train_sparse(str(start[0]), sparsity, data=str(data), resume=start[1], **args)
    elif start:
        from yoloslim.finetune import finetune

        finetune(start[0], data=data, teacher=None if start[1] else teacher, resume=start[1], **args)
    (out / name / "done").write_text("")
    return run / "best.pt"


def _sparse_train_args(args) -> dict:
    """The Ultralytics arguments the sparsity stage trained with: its route's recipe under the chosen one, as
    train_sparse lays them (so the finetune recipe keeps the route's one-step-per-batch nbs)."""
    route = SparsityConfig(targeted=args.targeted).recipe().train_args()
    route.pop("epochs")
    return {**route, **(SGD_TRAIN if args.sparse_recipe == "sgd" else FINETUNE_TRAIN)}


def _epochs_trained(best: Path, default: int) -> int:
    """How many epochs a finished stage trained: the rows of its run's results.csv, or `default` for a checkpoint
    outside a run folder."""
    csv = best.parent.parent / "results.csv"
    return len(csv.read_text().splitlines()) - 1 if csv.exists() else default


def _extra_cycle(out: Path, points: dict, data: Path, recipe: dict, epochs: int) -> dict:
    """The control and each finetuned model trained `epochs` more, each from its own best.pt, as a stage named after
    the one it continues."""
    trained = [name for name in points if name == "control" or name.startswith(("finetuned-", "distilled-"))]
    return {
        f"{name}-plus{epochs}": _train(out, f"{_stage(points[name])}-plus{epochs}", points[name], data, recipe, epochs)
        for name in trained
    }


def _distilled(amount: dict, distill: list[float] | None) -> bool:
    """Whether --distill asks for this prune: named by its ratio or target fraction, or every prune when bare."""
    return distill is not None and (not distill or any(value in distill for value in amount.values()))


def _sparse_tag(args) -> str:
    """The sparsity stage's name when this run trains it, so prunes of sparse models trained otherwise never mix;
    empty when the sparse model is given or there is none (--method l1)."""
    if args.method == "l1" or args.sparse:
        return ""
    tag = f"sr{args.sr}-e{args.sparse_epochs}" + ("" if args.sr_schedule == "constant" else f"-{args.sr_schedule}")
    tag += ("-targeted" if args.targeted else "") + ("-ftrecipe" if args.sparse_recipe == "finetune" else "")
    if args.stall_epochs != DEFAULT_SPARSITY.stall_epochs:
        tag += f"-stall{args.stall_epochs}"
    if args.stop_at_flops is None:
        return tag
    # where the run stops depends on the prune it measures, so that prune's guards name the stage too
    return tag + f"-stop{args.stop_at_flops}" + _guards_tag(args.min_keep, args.round_to)


def _sparse_changes(changed: dict, sparse_recipe: str) -> dict:
    """The --recipe changes the sparsity stage trains with: all of them over the finetune recipe; over the SGD
    recipe, those it does not set itself."""
    return {k: v for k, v in changed.items() if not (sparse_recipe == "sgd" and k in SGD_TRAIN)}


def _recipe_tag(changed: dict) -> str:
    """The --recipe changes, for the names of the stages they train."""
    return "".join(f"-{key}{value}" for key, value in changed.items())


def _prune_tag(config: PruneConfig) -> str:
    """A prune's name: its amount, then its per-layer minimum and rounding unless default, so a rerun with other
    settings reuses nothing."""
    tag = "l1-" if config.method == "l1" else ""
    if config.ratio is not None:
        tag += f"{config.ratio}"
    else:
        tag += f"flops{config.target_flops}" if config.target_latency is None else f"lat{config.target_latency}"
    return tag + _guards_tag(config.min_keep, config.round_to)


def _guards_tag(min_keep: float, round_to: int) -> str:
    """A prune's per-layer minimum and rounding, each unless default."""
    return ("" if min_keep == DEFAULT_PRUNE.min_keep else f"-mk{min_keep}") + (
        "" if round_to == DEFAULT_PRUNE.round_to else f"-r{round_to}"
    )


def _prune(out: Path, weights: Path, config: PruneConfig, tag: str, compensate: bool) -> Path:
    from yoloslim.prune import prune

    target = out / f"pruned-{tag}{'' if compensate else '-nocomp'}.pt"
    if not target.exists():
        prune(weights, dataclasses.replace(config, compensate=compensate), out=target)
    return target


def _measure(
    out: Path, points: dict, data: Path, imgsz: int, threads: list[int], references: dict | None = None
) -> dict:
    """Every point's params, GFLOPs, mAP50-95 and latency against "base", and its paired mAP change against the point
    `references` names for it (default: the one it is judged by, _references)."""
    import numpy as np

    from yoloslim.evaluate import paired_bootstrap_delta, predict_records, split_images, summarise
    from yoloslim.export.onnx import export_onnx
    from yoloslim.graph import model_stats
    from yoloslim.runtime.backends import OnnxRuntimeBackend, load_backend
    from yoloslim.utils.checks import load_detection_checkpoint
    from yoloslim.utils.timing import compare_latency, speedup_interval

    images, names = split_images(data, "val")
    rows, onnx, records = {}, {}, {}
    for name, weights in points.items():
        model, _ = load_detection_checkpoint(weights, classic=True)
        stats = model_stats(model.float(), imgsz)
        records[name] = predict_records(load_backend(weights), images, imgsz)
        metrics = summarise(records[name], names)
        onnx[name] = out / "onnx" / f"{_stage(weights)}.onnx"
        if (
            not onnx[name].exists() or onnx[name].stat().st_mtime < Path(weights).stat().st_mtime
        ):  # a stage redone since
            export_onnx(weights, imgsz=imgsz, out=onnx[name])  # the graph yoloslim deploys, as users get it
        rows[name] = {
            **stats,
            "map": metrics.map,
            "map_ci95": metrics.ci95["map"],
            "map50": metrics.map50,
            "weights": str(weights),
            "onnx": str(onnx[name]),
            "gflops_reduction": None,
            "latency_ms_p50": {},
            "speedup": {},
            "speedup_ci95": {},
        }
    for name, reference in (references or _references(points)).items():
        delta, low, high = paired_bootstrap_delta(records[reference], records[name], num_classes=max(len(names), 1))[
            "map"
        ]
        rows[name]["map_delta"] = {"against": reference, "delta": delta, "ci95": [low, high]}
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    for n in threads:
        backends = {name: OnnxRuntimeBackend(str(path), threads=n) for name, path in onnx.items()}
        latency = compare_latency({name: (lambda b=b: b(x)) for name, b in backends.items()}, rounds=LATENCY_ROUNDS)
        for name, lat in latency.items():
            rows[name]["latency_ms_p50"][str(n)] = lat.p50_ms
            rows[name]["speedup"][str(n)] = latency["base"].p50_ms / lat.p50_ms
            rows[name]["speedup_ci95"][str(n)] = speedup_interval(latency["base"], lat)
    for row in rows.values():
        row["gflops_reduction"] = rows["base"]["gflops"] / row["gflops"]
    return {"points": rows, "criteria": _criteria(rows)}


def _stage(weights: Path) -> str:
    """What made a checkpoint: its training stage's folder, or its own file name. A point's name would not do: "sparse"
    and "control" are different models in runs with other settings."""
    return (
        weights.parents[1].name
        if weights.parent.name == "weights" and weights.name in ("best.pt", "last.pt")
        else weights.stem
    )


def _references(points: dict) -> dict:
    """The point each one is compared with on the same images: what it was made from, or for a finetune, the control."""
    return {name: _reference(name) for name in points if _reference(name) in points}


def _reference(name: str) -> str | None:
    if name in ("sparse", "control"):
        return "base"
    if name.startswith("pruned-"):
        return "base" if name.startswith("pruned-l1-") else "sparse"
    cycle = name[name.rfind("-plus") :] if "-plus" in name else ""
    if name == f"control{cycle}":
        return "control"
    return f"control{cycle}" if name.startswith(("finetuned-", "distilled-")) else None


def _criteria(rows: dict) -> list[dict]:
    """What a good prune achieves, checked at every prune that removes at least half of the GFLOPs: a speedup of at
    least 0.85 of the GFLOPs reduction; right after pruning a sparsity-trained model, at most 1 point under it; after
    finetuning, at most 1 point under the control. Accuracy is judged on the paired change's point estimate (the same
    images), not allowed the CI half-width: on a hundred validation images that would excuse a 5-point loss."""

    checks = []
    for name, row in rows.items():
        if not name.startswith("pruned-") or name.endswith("-nocomp") or row["gflops_reduction"] < 2:
            continue
        ratio = name.removeprefix("pruned-")
        for n, speedup in row["speedup"].items():
            low, high = row.get("speedup_ci95", {}).get(n, (None, None))
            checks.append(
                {
                    "point": name,
                    "criterion": f"speedup >= 0.85 x GFLOPs reduction ({n} thread{'' if n == '1' else 's'})",
                    "value": speedup / row["gflops_reduction"],
                    "needed": 0.85,
                    "ci95": None if low is None else [low / row["gflops_reduction"], high / row["gflops_reduction"]],
                }
            )
        if (
            _reference(name) == "sparse"
        ):  # only a sparsity-trained model is expected to survive the prune; an L1 prune of the base is not
            sparse = rows["sparse"]
            checks.append(
                {
                    "point": name,
                    "criterion": "mAP50-95 right after pruning >= sparse - 1 pt",
                    "value": row["map"],
                    "needed": sparse["map"] - MAP_ALLOWANCE,
                    "paired": row.get("map_delta"),
                }
            )
        for tuned, control in _tuned_points(rows, ratio):
            checks.append(
                {
                    "point": tuned,
                    "criterion": "mAP50-95 after finetuning >= control - 1 pt",
                    "value": rows[tuned]["map"],
                    "needed": control["map"] - MAP_ALLOWANCE,
                    "paired": rows[tuned].get("map_delta"),
                }
            )
    for check in checks:
        check["met"] = check["value"] >= check["needed"]
    return checks


def _tuned_points(rows: dict, ratio: str) -> list[tuple[str, dict]]:
    """Each finetune of this prune in the results, with the control it is judged by (same epochs)."""
    tuned = re.compile(
        rf"(finetuned-{re.escape(ratio)}|distilled-{re.escape(ratio)}(-control)?(-dis[0-9.eE+-]+)?)(-plus[0-9]+)?"
    )
    return [(name, rows[_reference(name)]) for name in rows if tuned.fullmatch(name) and _reference(name) in rows]


def _budgets(settings: dict) -> str:
    if settings.get("method") == "l1":
        sparse = "no sparsity training: the base pruned by filter L1 norm"
    elif settings["sparse"]:
        sparse = f"sparsity-trained checkpoint given ({settings['sparse']})"
    else:
        sparse = f"sparsity {settings['sparse_epochs']} epochs at sr {settings['sr']} ({settings['sr_schedule']})"
        if settings.get("targeted"):
            sparse += ", targeted (only the channels the prune would remove paid it)"
            stall = settings.get("stall_epochs")
            if stall is not None and settings["sr_schedule"] == "constant":
                rises = f", sr tripled after each {stall} epochs without new zeroed channels"
                sparse += rises if stall else ", sr fixed"
        if settings.get("sparse_recipe") == "finetune":
            nbs = settings.get("sparsity", {}).get("nbs")
            sparse += ", trained with the finetune recipe" + (f" at nbs {nbs}, a penalty step per batch" if nbs else "")
        if settings.get("stop_at_flops") is not None:
            sparse += (
                f", to end once its channels below |gamma| 0.01 gave a prune to {settings['stop_at_flops']} of the "
                f"GFLOPs (it trained {settings['sparse_epochs_used']} of its {settings['sparse_epochs']} epochs)"
            )
    min_keep = settings.get("min_keep", DEFAULT_PRUNE.min_keep)
    sparse += f"; pruned widths rounded to multiples of {settings['round_to']}, at least {min_keep} of each layer kept"
    if settings["skip_finetune"]:
        return sparse + "; no finetuning."
    teachers = "not distilled"
    if settings.get("distill") is not None:
        teachers = "; ".join(
            "distilled-*: teacher = base" if t == "base" else f"distilled-*-{t}: teacher = {t}"
            for t in settings["distill_teacher"]
        )
        teachers += (
            "" if settings.get("distill_weight") is None else f", distillation weight dis {settings['distill_weight']}"
        )
    recipe = settings["recipe"]
    lr0 = f" lr0 {recipe['lr0']}" if "lr0" in recipe else " (Ultralytics' choice of learning rate)"
    how = f"{recipe['optimizer']}{lr0}, batch {recipe['batch']}" + (f", nbs {recipe['nbs']}" if "nbs" in recipe else "")
    how += "".join(f", {change}" for change in settings.get("recipe_changes", []))
    cycle = settings.get("extra_cycle")
    cycle = f"; *-plus{cycle}: a second cycle of {cycle} epochs each from its best.pt" if cycle else ""
    return (
        sparse + f"; finetune {settings['finetune_epochs_used']} epochs of {how} ({teachers}); "
        f"control = unpruned, the same extra epochs, all with the finetune recipe{cycle}."
    )


def _delta(delta: dict | None) -> str:
    if not delta:
        return ""
    d, (lo, hi) = delta["delta"], delta["ci95"]
    return f"{100 * d:+.1f} pt ({100 * lo:+.1f} to {100 * hi:+.1f}) ({delta['against']})"


def _check_interval(check: dict) -> str:
    if check.get("ci95"):
        return "{:.2f}-{:.2f}".format(*check["ci95"])
    return _delta(check.get("paired"))


def _markdown(results: dict) -> str:
    threads = list(next(iter(results["points"].values()))["latency_ms_p50"])
    env, settings = results["env"], results["settings"]
    lines = [
        f"# Pruning benchmark ({Path(settings['weights']).name})",
        "",
        f"`{results['command']}`",
        "",
        f"ONNX Runtime {env['onnxruntime']} CPU ({env['cpu']}, {env['cpu_vector_isa']}), batch 1, latency p50 at "
        f"{' and '.join(threads)} threads pinned, {env['cores']} cores, every point timed in the same interleaved "
        f"pass as the unpruned model; imgsz {settings['recipe']['imgsz']}; {_budgets(settings)}",
        "",
        "| point | params | GFLOPs | GFLOPs ÷ | "
        + " | ".join(f"ms ({n}T) | speedup ({n}T)" for n in threads)
        + " | mAP50-95 (95% CI) | mAP50-95 change, paired 95% CI (against) |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---: | ---:" for _ in threads) + " | --- | --- |",
    ]
    for name, r in results["points"].items():
        lo, hi = r["map_ci95"]
        timing = " | ".join(f"{r['latency_ms_p50'][n]:.2f} | {r['speedup'][n]:.2f}" for n in threads)
        lines.append(
            f"| {name} | {r['params']:,} | {r['gflops']:.3f} | {r['gflops_reduction']:.2f} | {timing} "
            f"| {r['map']:.3f} ({lo:.3f}-{hi:.3f}) | {_delta(r.get('map_delta'))} |"
        )
    lines += ["", "## Criteria (prunes removing at least half of the GFLOPs)", ""]
    if not results["criteria"]:
        lines.append(
            "No prune here removes half of the GFLOPs, so no criterion applies; prune further (`--target-flops 0.5`)."
        )
        return "\n".join(lines) + "\n"
    lines += [
        "Judged on the point estimates; the interval beside a speed figure resamples the timing rounds, the one beside "
        "an mAP is the paired change against the criterion's reference.",
        "",
        "| point | criterion | value | interval | needed | met |",
        "| --- | --- | ---: | --- | ---: | --- |",
    ]
    # judged unrounded: 0.8499 of the reduction misses 0.85
    lines += [
        f"| {c['point']} | {c['criterion']} | {c['value']:.4f} | {_check_interval(c)} | {c['needed']:.4f} "
        f"| {'yes' if c['met'] else '**no**'} |"
        for c in results["criteria"]
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from yoloslim.utils.errors import YoloslimError

    try:
        main()
    except YoloslimError as e:
        sys.exit(f"bench_prune: error: {e}")
