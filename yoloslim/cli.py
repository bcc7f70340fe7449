"""The `yoloslim` command: a thin layer that parses arguments and calls the Python API of each stage."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from typing import Sequence

from yoloslim.utils.assets import BASELINE, SPARSE_BASELINE
from yoloslim.utils.errors import YoloslimError, first_line

IMGSZ_HELP = (
    "input size for models without a fixed one, rounded up to the stride (default: the size the model was trained "
    "or exported at, else 640)"
)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("YOLO_OFFLINE", "1")  # no network here: skip Ultralytics' online checks and their time-outs
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        check_no_empty_paths(args)
        return args.run(args) or 0
    except YoloslimError as e:
        print(f"yoloslim {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output folder that cannot be made or written, e.g. a --project under a file
        where = f" {e.filename}" if e.filename else ""
        print(
            f"yoloslim {args.command}: error: cannot write or read{where}: {e.strerror or e}; check the path and its "
            "permissions",
            file=sys.stderr,
        )
        return 2


# Options naming files, folders or runs: an empty one (a shell variable that was not set) would read as left out and
# pick the default, the shipped model or dataset, without a word
PATH_OPTIONS = ("weights", "data", "out", "source", "teacher", "latency_table", "project", "name")


def check_no_empty_paths(args: argparse.Namespace) -> None:
    for dest in PATH_OPTIONS:
        value = getattr(args, dest, None)
        if "" in (value if isinstance(value, list) else [value]):
            raise YoloslimError(f"--{dest.replace('_', '-')} is empty; give it a value, or leave the option out")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yoloslim",
        description="Slim YOLO detectors (Ultralytics YOLOv5u, YOLOv8, YOLO11, YOLO26; classic YOLOv5) for the edge.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(commands)
    _add_profile(commands)
    _add_prune(commands)
    _add_finetune(commands)
    _add_eval(commands)
    _add_export(commands)
    _add_detect(commands)
    _add_doctor(commands)
    _add_bench(commands)
    _add_report(commands)
    _add_slim(commands)
    return parser


def _add_settings(sub, settings: type, skip: tuple = ()) -> None:
    """One option per field of a settings dataclass (yoloslim/config.py), its default and help read from the field."""
    hints = typing.get_type_hints(settings)
    for f in dataclasses.fields(settings):
        if f.name in skip:
            continue
        flag, text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        kind = _scalar_type(hints[f.name])
        if kind is bool:
            both = sub.add_mutually_exclusive_group()
            both.add_argument(
                flag,
                dest=f.name,
                action="store_true",
                default=f.default,
                help=text + (" (default)" if f.default else ""),
            )
            both.add_argument(
                "--no-" + flag[2:],
                dest=f.name,
                action="store_false",
                help="do not" + (" (default)" if not f.default else ""),
            )
            continue
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        shown = "" if f.default is None else f" (default {f.default})"
        sub.add_argument(flag, dest=f.name, type=kind, default=f.default, help=text + shown, **extra)


def _scalar_type(hint) -> type:
    """float for Optional[float], str for Literal["a", "b"]: what argparse converts an option's text to."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return type(args[0])
    return _scalar_type(args[0]) if args else hint


def _settings_from(settings: type, args: argparse.Namespace):
    return settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(settings) if hasattr(args, f.name)})


def _add_train(commands) -> None:
    from yoloslim.config import SPARSITY_RECIPE, UNIFORM_SPARSITY_RECIPE, SparsityConfig

    uniform = " ".join(f"{k}={v}" for k, v in UNIFORM_SPARSITY_RECIPE.train_args().items())
    sub = commands.add_parser(
        "train",
        help="sparsity training (L1 on BatchNorm gamma) of a detection model",
        description="Sparsity training: Ultralytics training plus an L1 penalty on BatchNorm scale factors. With no "
        "option it runs the measured recipe: the penalty falls on the channels a prune to half the GFLOPs would "
        "remove, and the run stops once that prune is free. --no-targeted penalises every gamma and trains with "
        f"that route's recipe ({uniform}). Extra Ultralytics train arguments pass through as key=value (e.g. "
        "lr0=0.005 close_mosaic=5).",
    )
    sub.add_argument("--weights", help=f"detection checkpoint to train (default: the shipped {BASELINE})")
    sub.add_argument("--data", help="dataset yaml (default: the embedded synthetic dataset)")
    _add_settings(sub, SparsityConfig)
    _add_ultralytics_train_args(sub, SPARSITY_RECIPE, (UNIFORM_SPARSITY_RECIPE, "--no-targeted"))
    sub.set_defaults(run=_run_train)


def _add_ultralytics_train_args(sub, recipe, other: tuple | None = None) -> None:
    """The Ultralytics arguments a training command names, their defaults `recipe`'s (and `other`: (the recipe, the
    flag that picks it), where a flag picks another)."""

    def default(key: str) -> str:
        value = getattr(recipe, key)
        changed = other and getattr(other[0], key) != value
        return f"(default {value}" + (f"; {getattr(other[0], key)} with {other[1]})" if changed else ")")

    recipe_args = " ".join(f"{k}={v}" for k, v in recipe.train_args().items())
    sub.add_argument("--epochs", type=int, help=default("epochs"))
    sub.add_argument("--imgsz", type=int, help="(default: the checkpoint's training size)")
    sub.add_argument("--batch", type=int, help=default("batch"))
    sub.add_argument("--device")
    sub.add_argument(
        "--project", help="runs go to PROJECT/NAME; Ultralytics puts a relative PROJECT under runs/detect/"
    )
    sub.add_argument("--name")
    sub.add_argument("--resume", action="store_true", help="continue the run whose last.pt is --weights")
    sub.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=f"further Ultralytics train arguments, over the recipe's {recipe_args}",
    )


def _ultralytics_train_args(args: argparse.Namespace) -> dict:
    named = {k: getattr(args, k) for k in ("epochs", "imgsz", "batch", "device", "project", "name")}
    if named["epochs"] is not None and named["epochs"] < 1:
        raise YoloslimError(f"--epochs {named['epochs']} trains nothing; give 1 or more")
    return {**parse_overrides(args.overrides), **{k: v for k, v in named.items() if v is not None}}


def _run_train(args: argparse.Namespace) -> int:
    from yoloslim.config import SparsityConfig, changed_options
    from yoloslim.sparsity import train_sparse
    from yoloslim.utils.assets import shipped_file

    weights = args.weights or str(shipped_file("weights", BASELINE))
    config = _settings_from(SparsityConfig, args)
    if args.resume:  # a resumed run keeps its own settings
        given = changed_options(SparsityConfig, args)
        if given:
            raise YoloslimError(f"a resumed run keeps the sparsity settings it began with; drop {' and '.join(given)}")
        config = None
    train_sparse(weights, config, data=args.data, resume=args.resume, **_ultralytics_train_args(args))
    return 0


def _add_profile(commands) -> None:
    from yoloslim.profile import ProfileConfig

    sub = commands.add_parser(
        "profile",
        help="measure on this device how latency depends on each prunable group's width (torch-free for .onnx)",
        description="Times narrowed copies of the model on the backend it will run on, each interleaved with the "
        "unpruned model, and fits a latency predictor checked on random plans it did not see. The table feeds "
        "yoloslim prune --target-latency / --target-fps. Running the same command again continues an interrupted run.",
    )
    sub.add_argument("--weights", required=True, help="model.onnx (static shape) or best.pt (exported with torch)")
    _add_settings(sub, ProfileConfig, skip=("multiples",))
    sub.add_argument("--out", help="the table (default: <weights>-latency-BACKEND-PRECISION-Nt.json beside the input)")
    sub.set_defaults(run=_run_profile)


def _run_profile(args: argparse.Namespace) -> int:
    from yoloslim.profile import ProfileConfig, profile, table_summary

    table = profile(args.weights, _settings_from(ProfileConfig, args), out=args.out)
    print(table_summary(table))
    return 0


def _add_prune(commands) -> None:
    from yoloslim.config import PruneConfig

    sub = commands.add_parser(
        "prune",
        help="remove backbone, neck and head-inner channels for real",
        description="Channel pruning: smaller convolutions, consistent residual adds, concats and Detect head; "
        "writes a checkpoint in the input's format (Ultralytics', or the original YOLOv5 repository's) and a report "
        "beside it. Give at most one amount: --ratio, "
        "--threshold, --target-flops, or --target-latency or --target-fps with the --latency-table that yoloslim "
        "profile measured on the target.",
    )
    sub.add_argument("--weights", help=f"detection checkpoint (default: the shipped {SPARSE_BASELINE})")
    _add_settings(sub, PruneConfig)
    sub.add_argument(
        "--out",
        help="output checkpoint (default: <weights>-pruned.pt beside the input, or under "
        "runs/prune/ for the shipped weights; never overwriting)",
    )
    sub.add_argument("--dry-run", action="store_true", help="print the plan (widths, GFLOPs, params) and write nothing")
    sub.set_defaults(run=_run_prune)


def _run_prune(args: argparse.Namespace) -> int:
    from yoloslim.config import PruneConfig
    from yoloslim.prune import prune
    from yoloslim.prune.report import plan_table
    from yoloslim.utils.assets import shipped_file

    weights = args.weights or str(shipped_file("weights", SPARSE_BASELINE))
    result = prune(weights, _settings_from(PruneConfig, args), out=args.out, dry_run=args.dry_run)
    print(plan_table(result))
    if result.latency:
        from yoloslim.prune.latency import latency_lines

        print("\n" + "\n".join(latency_lines(result.latency)))
    if result.out:
        print(f"\nwrote {result.out} and its report {result.report}")
    return 0


def _add_finetune(commands) -> None:
    from yoloslim.config import FINETUNE_RECIPE, REVIVE_GAMMA, QatConfig

    sub = commands.add_parser(
        "finetune",
        help="finetune a pruned model, keeping its widths; optionally distilled",
        description="Ultralytics training that keeps the pruned architecture (plain YOLO('pruned.pt').train() "
        "rebuilds the original widths from the yaml). Extra Ultralytics train arguments pass through as key=value.",
    )
    sub.add_argument("--weights", required=True, help="pruned checkpoint")
    sub.add_argument("--data", help="dataset yaml (default: the embedded synthetic dataset)")
    sub.add_argument("--teacher", help="unpruned checkpoint to distill from (Ultralytics distill_model)")
    sub.add_argument(
        "--revive",
        type=float,
        default=REVIVE_GAMMA,
        metavar="GAMMA",
        help="start every BatchNorm gamma that is exactly zero (a stage sparsity training killed, which training "
        f"cannot bring back) at GAMMA; 0 leaves them (default {REVIVE_GAMMA:g}; not with --qat)",
    )
    _add_settings(sub, QatConfig)
    _add_ultralytics_train_args(sub, FINETUNE_RECIPE)
    sub.set_defaults(run=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from yoloslim.config import QatConfig
    from yoloslim.finetune import finetune

    qat = _settings_from(QatConfig, args)
    finetune(
        args.weights,
        data=args.data,
        teacher=args.teacher,
        resume=args.resume,
        qat=qat,
        revive=args.revive,
        **_ultralytics_train_args(args),
    )
    return 0


def _add_eval(commands) -> None:
    sub = commands.add_parser(
        "eval",
        help="mAP with 95%% bootstrap intervals, for .pt, .onnx and .engine models alike",
        description="One evaluator for every backend: the runtime's letterbox and NMS, COCO AP arithmetic "
        "(101-point, IoU 0.50:0.05:0.95), and a 95%% bootstrap interval over images. With several models, each "
        "one's mAP50-95 change against the first comes with a paired interval (the same images resampled for both), "
        "much tighter than the two intervals apart.",
    )
    sub.add_argument("--weights", nargs="+", required=True, help="models to evaluate (.pt, .onnx, .engine)")
    sub.add_argument("--data", help="dataset yaml (default: the embedded synthetic dataset)")
    sub.add_argument("--imgsz", type=int, help=IMGSZ_HELP)
    sub.add_argument("--split", default="val", choices=["train", "val", "test"])
    sub.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    sub.add_argument("--threads", type=int, help="CPU threads for inference (default: all cores), recorded")
    sub.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from yoloslim.evaluate import model_records, paired_bootstrap_delta, summarise

    if args.bootstrap < 0:
        raise YoloslimError(f"--bootstrap {args.bootstrap}: give the number of resamples, or 0 for no intervals")
    compare = len(args.weights) > 1 and args.bootstrap > 0
    print(
        "| model | mAP50 (95% CI) | mAP50-95 (95% CI) | P | R | images | instances |"
        + (" mAP50-95 change vs first, paired 95% CI |" if compare else "")
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |" + (" --- |" if compare else ""))
    first = None
    for weights in args.weights:
        records, names = model_records(weights, args.data, imgsz=args.imgsz, split=args.split, threads=args.threads)
        r = summarise(records, names, bootstrap=args.bootstrap)
        ci = {k: f" ({lo:.3f}-{hi:.3f})" for k, (lo, hi) in r.ci95.items()}
        change = ""
        if compare and first is None:
            first, change = records, " |"
        elif compare:
            delta, low, high = paired_bootstrap_delta(
                first, records, num_classes=max(len(names), 1), samples=args.bootstrap
            )["map"]
            change = f" {100 * delta:+.1f} pt ({100 * low:+.1f} to {100 * high:+.1f}) |"
        print(
            f"| {weights} | {r.map50:.3f}{ci.get('map50', '')} | {r.map:.3f}{ci.get('map', '')} | {r.precision:.3f} | "
            f"{r.recall:.3f} | {r.images} | {r.instances} |{change}"
        )
    return 0


def _add_export(commands) -> None:
    sub = commands.add_parser(
        "export",
        help="ONNX or Q/DQ INT8 ONNX on the host; TensorRT engines on the device",
        description="--format onnx runs on the host (torch, ultralytics). --format engine runs on the device with "
        "TensorRT (8.5 to 11) and builds from an ONNX (or from a .pt where torch is installed).",
    )
    sub.add_argument("--weights", required=True, help=".pt checkpoint (onnx, engine) or .onnx (engine)")
    sub.add_argument("--format", default="onnx", choices=["onnx", "engine"])
    sub.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    sub.add_argument(
        "--target",
        default="tensorrt",
        metavar="{tensorrt,cpu}",
        help="what the INT8 Q/DQ ONNX is placed for: TensorRT engines (default) or ONNX Runtime on a CPU",
    )
    sub.add_argument(
        "--data", help="dataset yaml for INT8 calibration (training split; default: the one the model was trained on)"
    )
    sub.add_argument(
        "--imgsz", type=int, help="input size, a multiple of the model's stride (default: the size it was trained at)"
    )
    sub.add_argument("--batch", type=int, default=1, help="static batch (default 1)")
    sub.add_argument("--dynamic", action="store_true", help="dynamic batch (engines get a profile up to --max-batch)")
    sub.add_argument("--max-batch", type=int, default=8)
    sub.add_argument("--workspace", type=float, default=2.0, help="TensorRT workspace, GiB")
    sub.add_argument(
        "--raw", action="store_true", help="bare TensorRT plan without the metadata header (trtexec, DeepStream)"
    )
    sub.add_argument(
        "--version-compatible",
        action="store_true",
        help="an engine that later TensorRT releases of the same major version can run (TensorRT 8.6+)",
    )
    sub.add_argument("--out", help="output file (default: beside the input)")
    sub.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from yoloslim.export import ExportConfig, export

    config = ExportConfig(
        format=args.format,
        precision=args.precision,
        imgsz=args.imgsz,
        batch=args.batch,
        dynamic=args.dynamic,
        max_batch=args.max_batch,
        workspace=args.workspace,
        raw=args.raw,
        version_compatible=args.version_compatible,
        target=args.target,
    )
    print(f"wrote {export(args.weights, config, data=args.data, out=args.out)}")
    return 0


def _add_detect(commands) -> None:
    from yoloslim.runtime.detect import DetectConfig

    sub = commands.add_parser(
        "detect", help="run a model on an image, folder, video or camera (torch-free for .onnx/.engine)"
    )
    sub.add_argument("--weights", required=True, help="model.engine, model.onnx or model.pt")
    sub.add_argument("--source", required=True, help="image, folder, video file, camera index or stream URL")
    sub.add_argument("--conf", type=float, default=DetectConfig.conf)
    sub.add_argument(
        "--iou",
        type=float,
        default=DetectConfig.iou,
        help="NMS IoU (default 0.7; 0.45 for the original YOLOv5 repository's anchor-based models, as its detect.py)",
    )
    sub.add_argument("--imgsz", type=int, default=DetectConfig.imgsz, help=IMGSZ_HELP)
    sub.add_argument("--save", action="store_true", help="save annotated images or video")
    sub.add_argument("--show", action="store_true", help="show annotated frames in a window (q quits)")
    sub.add_argument("--project", default=DetectConfig.project)
    sub.add_argument("--name", default=DetectConfig.name)
    sub.set_defaults(run=_run_detect)


def _run_detect(args: argparse.Namespace) -> int:
    from yoloslim.runtime.backends import load_backend
    from yoloslim.runtime.detect import DetectConfig, check_source, detect

    check_source(args.source)  # before the model loads, so a bad source is named as such
    with load_backend(args.weights) as backend:
        print(f"results in {detect(backend, args.source, _settings_from(DetectConfig, args))}")
    return 0


def _add_doctor(commands) -> None:
    sub = commands.add_parser(
        "doctor",
        help="what this device has and what each command needs; on a Jetson, check and benchmark TensorRT",
        description="Lists what this device has and what each command still needs. On a device with TensorRT, "
        "--selftest builds and checks small shipped engines and --benchmark measures engines of ONNX files "
        "(built, checked against ONNX Runtime, timed, evaluated) into one report.",
    )
    sub.add_argument(
        "--selftest", action="store_true", help="build the shipped self-test engines and compare with stored outputs"
    )
    sub.add_argument(
        "--benchmark",
        action="store_true",
        help="build the FP32/FP16/INT8 engines of --onnx, check them against ONNX Runtime where installed, time "
        "them and evaluate mAP; writes benchmark.json and benchmark.md",
    )
    sub.add_argument(
        "--onnx",
        nargs="+",
        default=[],
        metavar="FILE",
        help="ONNX files from yoloslim export (e.g. model.onnx model-fp16.onnx model-int8.onnx) for --benchmark "
        "(default: the shipped self-test models)",
    )
    sub.add_argument("--data", help="dataset yaml for --benchmark's mAP (default: the generated synthetic dataset)")
    sub.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds for --benchmark (default 20)")
    sub.add_argument("--project", default="runs/doctor")
    sub.add_argument("--name", default="benchmark")
    sub.set_defaults(run=_run_doctor)


def _run_doctor(args: argparse.Namespace) -> int:
    from yoloslim.runtime.doctor import report, selftest

    if (args.onnx or args.data) and not args.benchmark:
        raise YoloslimError("--onnx and --data are for --benchmark; add --benchmark")
    if args.rounds < 1:
        raise YoloslimError(f"--rounds must be at least 1, got {args.rounds}")
    print(report())
    ok = True
    if args.selftest:
        ok, text = selftest()
        print("\n" + text)
    if args.benchmark:
        from yoloslim.device_bench import device_benchmark, device_benchmark_markdown, write_device_benchmark

        result = device_benchmark(args.onnx, data=args.data, rounds=args.rounds)
        run = write_device_benchmark(result, args.project, args.name)
        print("\n" + device_benchmark_markdown(result) + f"\nwrote {run / 'benchmark.json'} and {run / 'benchmark.md'}")
    return 0 if ok else 1


def _add_bench(commands) -> None:
    sub = commands.add_parser("bench", help="latency (mean, p50, p90, p99) and FPS, model alone and end to end")
    sub.add_argument(
        "--weights", nargs="+", required=True, help="models to compare (.pt, .onnx, .engine), timed interleaved"
    )
    sub.add_argument("--imgsz", type=int, help=IMGSZ_HELP)
    sub.add_argument("--batch", type=int, default=1)
    sub.add_argument(
        "--threads", type=int, help="CPU threads for torch and ONNX Runtime (default: all cores), recorded"
    )
    sub.add_argument("--source", help="image decoded in the end-to-end timing (default: the first val image of --data)")
    sub.add_argument(
        "--data",
        help="dataset yaml whose first val image the end-to-end timing decodes (default: the "
        "embedded synthetic dataset)",
    )
    sub.add_argument(
        "--ops", action="store_true", help="also profile each ONNX model's time by operator type (ONNX Runtime)"
    )
    sub.add_argument("--project", default="runs/bench")
    sub.add_argument("--name", default="bench")
    sub.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import json

    from yoloslim.bench import bench, bench_table
    from yoloslim.runtime.detect import new_run_dir
    from yoloslim.utils.files import write_text_atomic

    report = bench(
        args.weights,
        imgsz=args.imgsz,
        batch=args.batch,
        threads=args.threads,
        image=args.source,
        data=args.data,
        ops=args.ops,
    )
    run = new_run_dir(args.project, args.name)
    write_text_atomic(run / "bench.json", json.dumps(report, indent=2))
    print(bench_table(report))
    print(f"\nwrote {run / 'bench.json'}")
    return 0


def _add_report(commands) -> None:
    sub = commands.add_parser("report", help="comparison report (Markdown, HTML, CSV) of slim runs")
    sub.add_argument("runs", nargs="+", help="run folders written by yoloslim slim")
    sub.add_argument("--out", default="runs/report", help="output folder (default runs/report)")
    sub.set_defaults(run=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from yoloslim.report import write_report

    for path in write_report(args.runs, Path(args.out)).values():
        print(f"wrote {path}")
    return 0


def _add_slim(commands) -> None:
    from yoloslim.config import SlimConfig

    sub = commands.add_parser(
        "slim",
        help="the whole pipeline: sparsity, prune, finetune, export, eval, bench, report",
        description="Runs every stage into runs/slim/NAME, keeping each stage's output; the same command again resumes "
        "after the last finished stage. With no arguments: the shipped sparsity-trained demo model on the embedded "
        "dataset, a short finetune at imgsz 320. With --target-latency or --target-fps it first profiles this "
        "machine (or takes --latency-table) and prunes to that latency instead of to a fraction of the GFLOPs.",
    )
    _add_settings(sub, SlimConfig)
    sub.set_defaults(run=_run_slim)


def _run_slim(args: argparse.Namespace) -> int:
    import time

    from yoloslim.config import SlimConfig
    from yoloslim.slim import slim

    started = time.time()
    report = slim(_settings_from(SlimConfig, args))
    print(f"\nreport: {report}  ({(time.time() - started) / 60:.1f} min)")
    return 0


# Ultralytics arguments that yoloslim sets itself: each with the option to use instead. `model` and `pretrained`
# would swap the checkpoint being trained for another (the unpruned one, say) without a word.
_OWN_OPTION = {
    "data": "--data",
    "resume": "--resume",
    "epochs": "--epochs",
    "imgsz": "--imgsz",
    "batch": "--batch",
    "device": "--device",
    "project": "--project",
    "name": "--name",
    "model": "--weights",
    "pretrained": "--weights",
    "distill_model": "yoloslim finetune --teacher",
}


def parse_overrides(pairs: Sequence[str], allow: Sequence[str] = ()) -> dict:
    """Turn `key=value` words into Ultralytics arguments, refusing keys Ultralytics does not know and keys that
    yoloslim's own options set, except those in `allow` (a caller without that option)."""
    from ultralytics.cfg import check_cfg, smart_value
    from ultralytics.utils import DEFAULT_CFG_KEYS

    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise YoloslimError(f"argument {pair!r} is not key=value; write it like lr0=0.002")
        if key in _OWN_OPTION and key not in allow:
            raise YoloslimError(f"{key}= is set by yoloslim; use {_OWN_OPTION[key]} instead")
        if key not in DEFAULT_CFG_KEYS:
            raise YoloslimError(f"{key!r} is not an Ultralytics train argument; run 'yolo cfg' to list them")
        parsed[key] = smart_value(value)  # as Ultralytics' own command line reads it: lr0=1e-3 is 0.001
    check_optimizer(parsed.get("optimizer", "auto"))
    try:
        check_cfg(parsed)
    except (TypeError, ValueError) as e:
        raise YoloslimError(f"{first_line(e)}; fix that key=value argument") from None
    return parsed


def check_optimizer(name) -> None:
    from yoloslim.utils.training import ULTRALYTICS_OPTIMIZERS

    if str(name).lower() not in {o.lower() for o in ULTRALYTICS_OPTIMIZERS}:
        raise YoloslimError(
            f"optimizer={name} is not an Ultralytics optimizer; pick one of {', '.join(ULTRALYTICS_OPTIMIZERS)}"
        )


if __name__ == "__main__":
    sys.exit(main())
