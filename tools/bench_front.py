"""The accuracy-latency front: at the same latency on this CPU, is a pruned model better than the alternatives?

    python tools/bench_front.py --weights <license-plate>/license_plate_yolov5nu.pt --data <license-plate>/data.yaml \
        --prune-run runs/bench/prune/license_plate_yolov5nu --sparse-stage sparse-sr0.1-e30-stop0.5-r16 \
        --control-stage control-e50 --targets 0.5
    python tools/bench_front.py --smoke          # tiny data, one epoch per stage: checks the tool, not the models

The pruning benchmark (tools/bench_prune.py) trains the sparsity stage and the control; this tool reuses them from
its run folder (`--prune-run`, the stages named there) and adds, at each `--targets` fraction T of the unpruned
model's latency (the latency table `--latency-table`, or one `yoloslim profile` makes here at the first `--threads`):

- `latency-T`: `yoloslim prune --target-latency T` of the sparse model (bn), finetuned for the epochs its sparsity
  stage left of `--extra-epochs` (the control's);
- `flops-T`: the FLOPs-targeted prune of the same sparse model whose `target_flops` the table predicts at latency-T's
  latency, finetuned as long;
- `tp-T`: Torch-Pruning's magnitude method (tools/bench_torch_pruning.py: group L2 magnitude, the Detect head whole,
  widths rounded to `--round-to`), stepped from the base until the table predicts at most T, finetuned for all
  `--extra-epochs` (it has no sparsity stage);
- `scratch-T`: the base's own layout at the widest width multiple the table predicts at most T (the depth stays the
  model's: the table predicts widths, not layers), trained from scratch with the base's own training arguments for
  `--base-epochs` + `--extra-epochs`, the budget of the whole pruning pipeline;

against the control, the unpruned model trained `--extra-epochs` more. Every point: params, GFLOPs, mAP50-95 with its
95% interval and its paired change against latency-T, and ONNX Runtime latency at batch 1 interleaved with the unpruned
model at each `--threads`, pinned (the fraction of the unpruned latency, the speedup's interval over rounds, speedup /
GFLOPs reduction), and where its time goes at the first `--threads` (ONNX Runtime's profiler: the convolutions, which
can follow the GFLOPs, against everything else). Every stage is skipped when its output exists and a training resumes
from its last.pt: rerun the same command. `--lane ARM [ARM ...]` trains only those arms (of latency, flops, tp, scratch)
and measures nothing: split the arms between two lanes on two cores, then the command without `--lane` measures on a
quiet machine. Results: front.json and front.md in the run folder (default runs/bench/front/<weights name>).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_prune  # noqa: E402
import bench_torch_pruning  # noqa: E402

from yoloslim.bench import operator_times  # noqa: E402
from yoloslim.utils.files import atomic_path, write_text_atomic  # noqa: E402

# Arguments of the base's own training run that say where and how long, not how: the scratch model takes the rest.
NOT_RECIPE = ("model", "data", "epochs", "project", "name", "save_dir", "resume", "exist_ok", "pretrained", "time")
ARMS = ("latency", "flops", "tp", "scratch")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="the unpruned model (default: the shipped baseline)")
    parser.add_argument("--data", type=Path, help="its dataset yaml (default: the embedded synthetic dataset)")
    parser.add_argument("--prune-run", type=Path, help="the pruning benchmark's run folder of the same model")
    parser.add_argument("--sparse-stage", help="its sparsity stage's folder name (weights/best.pt: the sparse model)")
    parser.add_argument("--control-stage", help="its control's folder name")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5], help="fractions of the unpruned latency")
    parser.add_argument("--latency-table", type=Path, help="the base's latency table (default: profiled here)")
    parser.add_argument("--extra-epochs", type=int, default=50, help="the control's epochs beyond the base")
    parser.add_argument("--base-epochs", type=int, help="the epochs the base trained (default: its results.csv rows)")
    parser.add_argument("--round-to", type=int, default=8, help="Torch-Pruning's rounding (the example's 8)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="ONNX Runtime thread counts")
    parser.add_argument("--lane", nargs="+", choices=ARMS, help="train only these arms, measure nothing")
    parser.add_argument("--smoke", action="store_true", help="tiny data, imgsz 64, one epoch per stage")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/bench/front/<weights name>)")
    args = parser.parse_args(argv)
    if not args.smoke and not (args.prune_run and args.sparse_stage and args.control_stage):
        parser.error("name the pruning benchmark's run: --prune-run, --sparse-stage and --control-stage")
    return args


def main(argv=None) -> None:
    from yoloslim.data import resolve_data
    from yoloslim.profile import LatencyTable
    from yoloslim.utils.assets import BASELINE, shipped_file

    args = parse_args(argv)
    base = args.weights or shipped_file("weights", BASELINE)
    out = args.out or ROOT / "runs" / "bench" / "front" / (base.stem + ("-smoke" if args.smoke else ""))
    out.mkdir(parents=True, exist_ok=True)
    recipe = {**bench_prune.COMMON, **bench_prune.FINETUNE_TRAIN, "project": str(out)}
    if args.smoke:
        data = bench_prune._smoke_data(out, base)
        recipe.update(imgsz=64, batch=4)
        args.extra_epochs, args.base_epochs = 2, 1
        sparse, control = _smoke_stages(out, base, data, recipe)
    else:
        data = resolve_data(args.data)
        recipe["imgsz"] = bench_prune._trained_imgsz(base)
        sparse = args.prune_run / args.sparse_stage / "weights" / "best.pt"
        control = args.prune_run / args.control_stage / "weights" / "best.pt"
        for stage in (sparse,) if args.lane else (sparse, control):  # a lane trains beside the control's own
            if not stage.exists():
                sys.exit(f"bench_front: error: {stage} does not exist; run tools/bench_prune.py first")
    table_path = _table(base, out, recipe["imgsz"], args)
    table = LatencyTable.load(table_path)
    tune_epochs = args.extra_epochs - bench_prune._epochs_trained(sparse, args.extra_epochs)
    points = {"base": base, "control": control}
    references = {"control": "base"}
    unreachable = {}
    for target in args.targets:
        tag = f"{target:g}"
        prunes, missed = _prunes(out, base, sparse, table_path, target, recipe["imgsz"], args)
        unreachable.update({f"{arm}-{tag}": why for arm, why in missed.items()})
        lane = args.lane or ARMS
        for arm in (arm for arm in prunes if arm in lane):
            epochs = args.extra_epochs if arm == "tp" else tune_epochs
            points[f"{arm}-{tag}"] = bench_prune._train(
                out, f"finetune-{prunes[arm].stem}-e{epochs}", prunes[arm], data, recipe, epochs
            )
        if "scratch" in lane:
            points[f"scratch-{tag}"] = _scratch(out, base, data, table, target, args)
        others = (f"{arm}-{tag}" for arm in ARMS if arm != "latency")
        references.update({name: f"latency-{tag}" for name in others if name not in unreachable})
        references[f"latency-{tag}"] = "control"
    if args.lane:
        return
    results = bench_prune._measure(out, points, data, recipe["imgsz"], args.threads, references=references)
    results.pop("criteria")
    for name, path in points.items():
        results["points"][name]["predicted"] = _predicted(path, table)
        results["points"][name]["operators_ms"] = operator_times(
            Path(results["points"][name]["onnx"]), args.threads[0], imgsz=recipe["imgsz"]
        )
    results["settings"] = {**vars(args), "finetune_epochs": tune_epochs, "recipe": recipe, "command": _command(argv)}
    results["table"] = {"path": str(table_path), "describe": table.describe()}
    results["unreachable"] = unreachable
    write_text_atomic(out / "front.json", json.dumps(results, indent=2, default=str))
    write_text_atomic(out / "front.md", markdown(results))
    print(markdown(results))


def _smoke_stages(out: Path, base: Path, data: Path, recipe: dict) -> tuple[Path, Path]:
    """One-epoch sparse and control stages of the smoke run."""
    sparsity = bench_prune.DEFAULT_SPARSITY
    sparse = bench_prune._train(out, "sparse", base, data, recipe, 1, sparsity=sparsity)
    return sparse, bench_prune._train(out, "control", base, data, recipe, 2)


def _table(base: Path, out: Path, imgsz: int, args) -> Path:
    """The base's latency table: the one given, or profiled here (resumable) at the first --threads."""
    from yoloslim.export.onnx import export_onnx
    from yoloslim.profile import ProfileConfig, profile

    if args.latency_table:
        return args.latency_table
    onnx_path = out / "base.onnx"
    if not onnx_path.exists():
        export_onnx(base, imgsz=imgsz, out=onnx_path)
    quick = {"rounds": 2, "per_round": 1, "fit_plans": 4} if args.smoke else {}
    profile(onnx_path, ProfileConfig(threads=args.threads[0], **quick), out=out / "table.json")
    return out / "table.json"


def _prunes(out: Path, base: Path, sparse: Path, table_path: Path, target: float, imgsz: int, args):
    """arm -> pruned checkpoint at this target, each made once; and arm -> why, for an arm that cannot reach it
    (Torch-Pruning's method keeps the Detect head whole, whose latency a deep target leaves no room for)."""
    from yoloslim.config import PruneConfig
    from yoloslim.profile import LatencyTable
    from yoloslim.prune import prune
    from yoloslim.utils.errors import YoloslimError
    from yoloslim.utils.training import read_checkpoint_extras

    tag = f"{target:g}"
    common = dict(method="bn", latency_table=str(table_path), imgsz=imgsz)
    paths = {arm: out / f"{arm}-{tag}.pt" for arm in ("latency", "flops", "tp")}
    if not paths["latency"].exists():
        prune(sparse, PruneConfig(target_latency=target, **common), out=paths["latency"])
    if not paths["flops"].exists():
        aim = read_checkpoint_extras(paths["latency"])["prune"]["latency"]["predicted"]
        flops = _matched_flops(sparse, common, aim)
        prune(sparse, PruneConfig(target_flops=flops, **common), out=paths["flops"])
    missed = paths["tp"].with_suffix(".unreachable")  # the attempt's verdict, kept so a rerun does not repeat it
    if not paths["tp"].exists() and not missed.exists():
        try:
            _torch_pruning(base, LatencyTable.load(table_path), target, imgsz, args.round_to, paths["tp"])
        except YoloslimError as e:
            write_text_atomic(missed, str(e))
    if missed.exists():
        return {arm: path for arm, path in paths.items() if arm != "tp"}, {"tp": missed.read_text()}
    return paths, {}


def _matched_flops(sparse: Path, common: dict, aim: float) -> float:
    """The target_flops whose prune the table predicts at `aim` or faster (bisection)."""
    from yoloslim.config import PruneConfig
    from yoloslim.prune import prune_model
    from yoloslim.utils.checks import load_detection_checkpoint
    from yoloslim.utils.errors import YoloslimError

    model = load_detection_checkpoint(sparse)[0].float()
    lo, hi = 0.02, 1.0
    for _ in range(10):
        mid = (lo + hi) / 2
        try:
            fast_enough = prune_model(model, PruneConfig(target_flops=mid, **common)).latency["predicted"] <= aim
        except YoloslimError:  # out of the guards' reach: aim higher
            fast_enough = True
        lo, hi = (mid, hi) if fast_enough else (lo, mid)
    return round(lo, 4)


def _torch_pruning(base: Path, table, target: float, imgsz: int, round_to: int, out: Path) -> None:
    """Torch-Pruning's method stepped from the base until the table predicts at most `target`; an ordinary checkpoint
    (the YOLOv5u family has no C2f for the method to split)."""
    import torch

    from yoloslim.prune.latency import model_latency
    from yoloslim.utils.checks import load_detection_checkpoint

    model, ckpt = load_detection_checkpoint(base)
    pruned, steps = bench_torch_pruning.torch_pruning_steps(
        model,
        imgsz,
        round_to,
        done=lambda m: model_latency(m, table)["predicted"] <= target,
        goal=f"{target} of the unpruned latency",
    )
    print(f"tp-{target:g}: {steps} steps, predicted {model_latency(pruned, table)['predicted']}")
    with atomic_path(out) as tmp:
        torch.save({**ckpt, "model": pruned.half(), "ema": None, "optimizer": None}, tmp)


def _scratch(out: Path, base: Path, data: Path, table, target: float, args) -> Path:
    """The base's layout at the widest width multiple predicted at most `target`, trained from scratch."""
    import yaml
    from ultralytics import YOLO

    from yoloslim.utils.checks import load_detection_checkpoint
    from yoloslim.utils.training import resume_point

    name = f"scratch-{target:g}"
    run = out / name / "weights"
    if (out / name / "done").exists():
        return run / "best.pt"
    model, ckpt = load_detection_checkpoint(base)
    trained_args = ckpt.get("train_args") or {}
    epochs = (args.base_epochs or trained_args["epochs"]) + args.extra_epochs
    cfg = out / f"{name}.yaml"
    if not cfg.exists():
        write_text_atomic(cfg, yaml.safe_dump(_narrowest_layout(model.yaml, table, target), sort_keys=False))
    start = resume_point(run / "last.pt", cfg)
    if start and start[1]:
        YOLO(str(start[0])).train(resume=True)
    else:
        recipe = {k: v for k, v in trained_args.items() if k not in NOT_RECIPE} | {"workers": 0, "seed": 0}
        if args.smoke:
            recipe.update(imgsz=64, batch=4)
        YOLO(str(cfg)).train(
            data=str(data), epochs=epochs, pretrained=False, project=str(out), name=name, exist_ok=True, **recipe
        )
    (out / name / "done").write_text("")
    return run / "best.pt"


def width_multiple_for(layout: dict, predict, target: float) -> float:
    """The widest width multiple, in steps of 1/256, whose model `predict` puts at most `target`."""
    scale = layout.get("scale")
    full = layout["scales"][scale][1] if scale else layout.get("width_multiple", 1.0)
    for step in range(int(full * 256), 0, -1):
        if predict(with_width(layout, step / 256)) <= target:
            return step / 256
    raise ValueError(f"no width multiple reaches {target} of the unpruned latency")


def with_width(layout: dict, width: float) -> dict:
    """A model yaml dict at another width multiple (its scale's, for Ultralytics' scaled yamls)."""
    scale = layout.get("scale")
    if not scale:
        return {**layout, "width_multiple": width}
    depth, _, max_channels = layout["scales"][scale]
    return {**layout, "scales": {scale: [depth, width, max_channels]}}


def _narrowest_layout(layout: dict, table, target: float) -> dict:
    from ultralytics.nn.tasks import DetectionModel

    from yoloslim.prune.latency import model_latency

    def predict(spec: dict) -> float:
        return model_latency(DetectionModel(dict(spec), nc=layout["nc"], verbose=False), table)["predicted"]

    return with_width(layout, width_multiple_for(layout, predict, target))


def _predicted(weights: Path, table) -> float | None:
    """The table's prediction for a point, None where its layout is not the table's (none here should be)."""
    from yoloslim.prune.latency import model_latency
    from yoloslim.utils.checks import load_detection_checkpoint
    from yoloslim.utils.errors import YoloslimError

    try:
        return model_latency(load_detection_checkpoint(weights)[0].float(), table)["predicted"]
    except YoloslimError:
        return None


def _command(argv: list[str] | None) -> str:
    return " ".join(["python tools/bench_front.py", *(sys.argv[1:] if argv is None else argv)])


def markdown(results: dict) -> str:
    threads = [str(n) for n in results["settings"]["threads"]]
    head = "| point | params | GFLOPs (÷) | predicted | mAP50-95 (95% CI) | paired change (against) | " + " | ".join(
        f"latency {n}T (speedup, 95% CI) | speedup ÷ GFLOPs reduction {n}T" for n in threads
    )
    lines = [
        "# Accuracy against latency",
        "",
        f"`{results['settings']['command']}`",
        "",
        f"Latency table: {results['table']['describe']}. Finetunes of the sparse model: "
        f"{results['settings']['finetune_epochs']} epochs; Torch-Pruning's: {results['settings']['extra_epochs']}.",
        "",
        head + " |",
        "|" + " --- |" * (6 + 2 * len(threads)),
    ]
    for name, row in results["points"].items():
        delta = row.get("map_delta")
        change = (
            f"{delta['delta'] * 100:+.1f} pt ({delta['ci95'][0] * 100:+.1f} to {delta['ci95'][1] * 100:+.1f}) "
            f"({delta['against']})"
            if delta
            else ""
        )
        cells = [
            name,
            f"{row['params']:,}",
            f"{row['gflops']:.3f} (÷{row['gflops_reduction']:.2f})",
            "" if row.get("predicted") is None else f"{row['predicted']:.3f}",
            f"{row['map']:.3f} ({row['map_ci95'][0]:.3f}-{row['map_ci95'][1]:.3f})",
            change,
        ]
        for n in threads:
            low, high = row["speedup_ci95"][n]
            cells += [
                f"{row['latency_ms_p50'][n]:.2f} ms ({row['speedup'][n]:.2f}x, {low:.2f}-{high:.2f})",
                f"{row['speedup'][n] / row['gflops_reduction']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _time_split(results["points"], threads[0])
    missed = results.get("unreachable") or {}
    lines += ["", *(f"- {name}: not reached ({why})" for name, why in missed.items())] if missed else []
    return "\n".join(lines) + "\n"


def _time_split(points: dict, threads: str) -> list:
    """Markdown lines: each point's convolution time and the rest (ONNX Runtime's profiler), each as a speedup over
    the base's; the convolutions' against the GFLOPs reduction, which they alone can follow."""
    if "operators_ms" not in points.get("base", {}):
        return []
    base = points["base"]["operators_ms"]
    base_conv, base_rest = base.get("Conv", 0.0), sum(base.values()) - base.get("Conv", 0.0)
    lines = [
        "",
        f"Where the time goes at {threads} thread(s), ONNX Runtime's profiler (ms per call; speedup over the base; "
        "the profiler slows small kernels, so its sums exceed the timed latency of the smaller models):",
        "",
        "| point | Conv | Conv speedup ÷ GFLOPs reduction | everything else | largest others |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name, row in points.items():
        ops = row["operators_ms"]
        conv, rest = ops.get("Conv", 0.0), sum(ops.values()) - ops.get("Conv", 0.0)
        others = ", ".join(f"{op} {ms:.2f}" for op, ms in list(ops.items())[:4] if op != "Conv")
        lines.append(
            f"| {name} | {conv:.2f} ({base_conv / conv:.2f}x) | {base_conv / conv / row['gflops_reduction']:.2f} | "
            f"{rest:.2f} ({base_rest / rest:.2f}x) | {others} |"
        )
    return lines


if __name__ == "__main__":
    main()
