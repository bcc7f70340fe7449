"""Speed of a prune to half the GFLOPs, without training: yoloslim's prune and Torch-Pruning's YOLOv8 method, each
against the unpruned model, on ONNX Runtime.

    python tools/bench_torch_pruning.py --weights best.pt             # a trained YOLOv8n, YOLO11n or YOLO26n
    python tools/bench_torch_pruning.py --cfg yolov8n.yaml yolo11n.yaml yolo26n.yaml   # untrained, built from yaml
    python tools/bench_torch_pruning.py --cfg yolo26n.yaml --methods yoloslim         # the speed row alone

Torch-Pruning's example (examples/yolov8 in github.com/VainF/Torch-Pruning) imports `ultralytics.yolo`, which
Ultralytics removed in 8.1, so it no longer runs. Its method is reproduced here with torch-pruning: every C2f (and its
subclass C3k2, YOLO11's and YOLO26's block) becomes the example's C2f_v2, whose split convolution is two convolutions
(the example's way round torch-pruning's coupling through `chunk`); the Detect head's layers are ignored; channels are
ranked by their group's L2 magnitude (GroupNormPruner with GroupMagnitudeImportance, no regularisation, as the
example); kept widths are rounded to multiples of --round-to; and steps of the example's per-step ratio, 1 - (1 -
0.5)^(1/16), repeat until the GFLOPs are at most --target-flops of the original. The example finetunes between steps;
speed does not depend on the weights, so no step trains here. For YOLO11 and YOLO26, whose C2PSA and attention C3k2
view channels as heads, the attention layers are ignored as well: with them, torch-pruning's first step on a YOLO11n
did not finish in four minutes.

yoloslim's prune is `yoloslim prune --target-flops F --method M --round-to R`, M being bn for a sparsity-trained
checkpoint and l1 otherwise unless --method says. --yoloslim-variants adds yoloslim prunes with other settings, each
a space-free list of PruneConfig fields (e.g. `min_keep=0.4` or `min_keep=0.25,round_to=16`), timed in the same rounds.

Each variant is exported to ONNX as yoloslim exports (opset 17, simplified) and timed with ONNX Runtime at batch 1 at
each --threads count, pinned; one model's variants are timed interleaved, round by round (--rounds rounds of 5 calls
each), so load from other processes hits them alike. The interval beside a speedup resamples the rounds.

Resumable: the pruned checkpoints, the ONNX files and each model's timing stay under --out/<model>-<settings>/ and are
reused; rerun the same command. The Torch-Pruning checkpoint pickles this tool's C2f_v2 and loads only where this tool
is the main program.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from copy import deepcopy
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from ultralytics.nn.modules import C2f, Conv  # noqa: E402

from yoloslim.utils.errors import YoloslimError  # noqa: E402
from yoloslim.utils.files import atomic_path, write_text_atomic  # noqa: E402

METHODS = ("yoloslim", "torch-pruning")
# The example's schedule: 16 steps of an equal ratio remove half the channels (--target-prune-rate 0.5).
TP_STEP_RATIO = 1 - math.pow(1 - 0.5, 1 / 16)
TP_MAX_STEPS = 64
CFG_IMGSZ = 320  # models built from a yaml were never trained: time them at the license-plate benchmark's size


class C2f_v2(nn.Module):  # noqa: N801 (the example's name)
    """Torch-Pruning's C2f_v2: a C2f (or C3k2) whose first convolution's two halves are two convolutions."""

    def __init__(self, c2f: C2f):
        super().__init__()
        self.c = c2f.c
        self.cv0, self.cv1 = (_half_conv(c2f.cv1, part) for part in (slice(0, self.c), slice(self.c, 2 * self.c)))
        self.cv2, self.m = c2f.cv2, c2f.m
        for attr in ("i", "f", "type", "np"):  # what Ultralytics' forward and summaries read off a layer
            if hasattr(c2f, attr):
                setattr(self, attr, getattr(c2f, attr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def _half_conv(conv: Conv, part: slice) -> Conv:
    """A Conv computing the channels `part` of `conv`."""
    half = deepcopy(conv)
    half.conv.weight = nn.Parameter(conv.conv.weight.data[part].clone())
    half.conv.out_channels = half.bn.num_features = part.stop - part.start
    for name in ("weight", "bias"):
        setattr(half.bn, name, nn.Parameter(getattr(conv.bn, name).data[part].clone()))
    for name in ("running_mean", "running_var"):
        setattr(half.bn, name, getattr(conv.bn, name)[part].clone())
    return half


def split_c2f(module: nn.Module) -> None:
    """Replace every C2f (subclasses included) inside `module` by its C2f_v2, in place."""
    for name, child in module.named_children():
        if isinstance(child, C2f):
            setattr(module, name, C2f_v2(child))
        else:
            split_c2f(child)


def torch_pruning_prune(model: nn.Module, imgsz: int, target_flops: float, round_to: int) -> tuple[nn.Module, int]:
    """Torch-Pruning's YOLOv8 method on a copy of `model`, stepped until the GFLOPs are at most `target_flops` of the
    original; return the pruned model and the steps taken."""
    from yoloslim.graph import model_stats

    base = model_stats(deepcopy(model).float(), imgsz)["gflops"]
    return torch_pruning_steps(
        model,
        imgsz,
        round_to,
        done=lambda m: model_stats(m, imgsz)["gflops"] <= target_flops * base,
        goal=f"{target_flops} of the GFLOPs",
    )


def torch_pruning_steps(model: nn.Module, imgsz: int, round_to: int, done, goal: str) -> tuple[nn.Module, int]:
    """Torch-Pruning's YOLOv8 method on a copy of `model`, stepped until `done(model)`; return the pruned model and the
    steps taken. `goal` names what `done` checks, for the error when no step reaches it."""
    import torch_pruning as tp
    from ultralytics.nn.modules import Detect
    from ultralytics.nn.modules.block import Attention

    model = deepcopy(model).float()
    split_c2f(model)
    ignored = [m for m in model.modules() if isinstance(m, (Detect, Attention))]
    example = torch.rand(1, 3, imgsz, imgsz)
    for p in model.parameters():
        p.requires_grad_(True)
    for step in range(1, TP_MAX_STEPS + 1):
        model.train()  # as the example: the head's raw maps, no decoding
        pruner = tp.pruner.GroupNormPruner(
            model,
            example,
            importance=tp.importance.GroupMagnitudeImportance(),
            iterative_steps=1,
            pruning_ratio=TP_STEP_RATIO,
            ignored_layers=ignored,
            round_to=round_to,
        )
        pruner.step()
        model.eval()
        if done(model):
            return model, step
    raise YoloslimError(f"Torch-Pruning's method did not reach {goal} in {TP_MAX_STEPS} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path, nargs="+", help="Ultralytics detection checkpoints")
    source.add_argument("--cfg", nargs="+", help="Ultralytics model yamls (e.g. yolov8n.yaml), built untrained, nc=1")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "torch-pruning", help="results folder")
    parser.add_argument("--imgsz", type=int, help=f"image size (default: trained at, or {CFG_IMGSZ} for --cfg)")
    parser.add_argument("--target-flops", type=float, default=0.5, help="keep at most this fraction of the GFLOPs")
    parser.add_argument("--round-to", type=int, default=8, help="kept widths are multiples of this, in both prunes")
    parser.add_argument(
        "--method", choices=("bn", "l1"), help="yoloslim's criterion (default: bn if sparsity-trained, else l1)"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="the prunes to time")
    parser.add_argument(
        "--yoloslim-variants",
        nargs="+",
        type=parse_variant,
        default=[],
        metavar="FIELD=VALUE[,...]",
        help="more yoloslim prunes, each with these PruneConfig fields changed (e.g. min_keep=0.4 round_to=16)",
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="ONNX Runtime thread counts")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved timing rounds of 5 calls per variant")
    args = parser.parse_args()
    if not 0 < args.target_flops < 1:
        parser.error(f"--target-flops must be between 0 and 1, got {args.target_flops}")
    args.out.mkdir(parents=True, exist_ok=True)
    sources = args.weights or [_build(cfg, args.out) for cfg in args.cfg]
    results = {"models": [_bench_model(Path(weights), args) for weights in sources]}
    results.update(env=_environment(args.threads), command=_command(), settings=_settings(args))
    write_text_atomic(args.out / "results.json", json.dumps(results, indent=2, default=str))
    write_text_atomic(args.out / "results.md", markdown(results))
    print(markdown(results))


# Fields a variant may change: how the plan spreads the cut, not how much it cuts (the target stays --target-flops).
VARIANT_FIELDS = {"min_keep": float, "round_to": int}


def parse_variant(text: str) -> dict:
    """`min_keep=0.4,round_to=16` as {"min_keep": 0.4, "round_to": 16}."""
    settings = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in VARIANT_FIELDS or not value:
            raise argparse.ArgumentTypeError(
                f"{item!r}: give FIELD=VALUE with FIELD one of {', '.join(VARIANT_FIELDS)}"
            )
        try:
            settings[key] = VARIANT_FIELDS[key](value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{item!r}: {e}") from e
    return settings


def variant_name(settings: dict) -> str:
    return "yoloslim" + "".join(f" {key}={value}" for key, value in settings.items())


def file_stem(name: str) -> str:
    return name.replace(" ", "_")


def _build(cfg: str, out: Path) -> Path:
    """An untrained model of `cfg` (nc=1, seed 0) saved as Ultralytics saves a checkpoint."""
    from ultralytics import __version__
    from ultralytics.nn.tasks import DetectionModel

    target = out / f"{Path(cfg).stem}-untrained.pt"
    if not target.exists():
        torch.manual_seed(0)
        model = DetectionModel(cfg, nc=1, verbose=False)
        model.args = {"imgsz": CFG_IMGSZ}
        ckpt = {"model": model.half(), "train_args": {"imgsz": CFG_IMGSZ}, "version": __version__, "ema": None}
        with atomic_path(target) as tmp:
            torch.save(ckpt, tmp)
    return target


def _bench_model(weights: Path, args) -> dict:
    """Prune, export and time one model's variants, or read what an earlier run measured."""
    from yoloslim.utils.checks import load_detection_checkpoint
    from yoloslim.utils.metadata import checkpoint_metadata

    model, ckpt = load_detection_checkpoint(weights)
    imgsz = args.imgsz or (ckpt.get("train_args") or {}).get("imgsz")
    if not isinstance(imgsz, int):
        raise YoloslimError(f"{weights} does not record the image size it was trained at; pass --imgsz")
    method = args.method or ("bn" if "sparsity" in checkpoint_metadata(ckpt) else "l1")
    folder = args.out / f"{weights.stem}-{imgsz}-flops{args.target_flops}-{method}-r{args.round_to}"
    folder.mkdir(parents=True, exist_ok=True)
    extra = "".join(f"-{file_stem(variant_name(v))}" for v in args.yoloslim_variants)
    timing = folder / f"timing-{'-'.join(args.methods)}{extra}-t{'-'.join(map(str, args.threads))}-n{args.rounds}.json"
    if timing.exists():
        return json.loads(timing.read_text())
    variants = {"unpruned": _variant(folder, "unpruned", model, weights, imgsz, lambda: None)}
    if "yoloslim" in args.methods:
        variants["yoloslim"] = _variant(
            folder, "yoloslim", model, weights, imgsz, lambda: _yoloslim_prune(weights, folder, imgsz, method, args)
        )
    for settings in args.yoloslim_variants:
        name = variant_name(settings)
        variants[name] = _variant(
            folder,
            name,
            model,
            weights,
            imgsz,
            lambda s=settings: _yoloslim_prune(weights, folder, imgsz, method, args, s),
        )
    if "torch-pruning" in args.methods:
        variants["torch-pruning"] = _variant(
            folder,
            "torch-pruning",
            model,
            weights,
            imgsz,
            lambda: _save_torch_pruning(model, ckpt, folder, imgsz, args),
        )
    _time(variants, imgsz, args.threads, args.rounds)
    result = {"model": weights.name, "weights": str(weights), "imgsz": imgsz, "yoloslim_method": method}
    result["variants"] = variants
    write_text_atomic(timing, json.dumps(result, indent=2))
    return result


def _variant(folder: Path, name: str, base_model: nn.Module, base: Path, imgsz: int, make) -> dict:
    """One variant's checkpoint (made by `make`, which returns its path and notes, or None for the base), ONNX file,
    parameters and GFLOPs; each file reused when present."""
    from yoloslim.export.onnx import export_onnx
    from yoloslim.graph import model_stats

    stats_file = folder / f"{file_stem(name)}.json"
    if stats_file.exists():
        return json.loads(stats_file.read_text())
    weights, notes = make() or (base, {})
    onnx = export_onnx(weights, imgsz=imgsz, out=folder / f"{file_stem(name)}.onnx")
    model = base_model if weights == base else torch.load(weights, weights_only=False)["model"].float()
    stats = {**model_stats(model, imgsz), "weights": str(weights), "onnx": str(onnx), **notes}
    write_text_atomic(stats_file, json.dumps(stats, indent=2))
    return stats


def _yoloslim_prune(
    weights: Path, folder: Path, imgsz: int, method: str, args, settings: dict | None = None
) -> tuple[Path, dict]:
    from yoloslim.prune import PruneConfig, prune

    settings = settings or {}
    fields = {"target_flops": args.target_flops, "method": method, "round_to": args.round_to, "imgsz": imgsz}
    config = PruneConfig(**(fields | settings))
    target = folder / f"{file_stem(variant_name(settings))}.pt"
    if target.exists():
        target.unlink()  # a prune interrupted before its stats were written; prune never overwrites
    result = prune(weights, config, out=target)
    return target, {"removed_fraction": result.removed_fraction}


def _save_torch_pruning(model: nn.Module, ckpt: dict, folder: Path, imgsz: int, args) -> tuple[Path, dict]:
    pruned, steps = torch_pruning_prune(model, imgsz, args.target_flops, args.round_to)
    target = folder / "torch-pruning.pt"
    with atomic_path(target) as tmp:
        torch.save({**ckpt, "model": pruned.half(), "ema": None, "optimizer": None}, tmp)
    return target, {"steps": steps}


def _time(variants: dict, imgsz: int, threads: list[int], rounds: int) -> None:
    """Latency of every variant, interleaved, at each thread count; speedups and their per-GFLOP ratio, in place."""
    import numpy as np

    from yoloslim.runtime.backends import OnnxRuntimeBackend
    from yoloslim.utils.timing import compare_latency, speedup_interval

    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    base = variants["unpruned"]
    for row in variants.values():
        row["gflops_reduction"] = base["gflops"] / row["gflops"]
        for key in ("latency_ms_p50", "speedup", "speedup_ci95", "speedup_per_reduction", "speedup_per_reduction_ci95"):
            row[key] = {}
    for n in threads:
        backends = {name: OnnxRuntimeBackend(row["onnx"], threads=n) for name, row in variants.items()}
        latency = compare_latency({name: (lambda b=b: b(x)) for name, b in backends.items()}, rounds=rounds)
        for name, row in variants.items():
            low, high = speedup_interval(latency["unpruned"], latency[name])
            speedup = latency["unpruned"].p50_ms / latency[name].p50_ms
            row["latency_ms_p50"][str(n)] = latency[name].p50_ms
            row["speedup"][str(n)], row["speedup_ci95"][str(n)] = speedup, [low, high]
            row["speedup_per_reduction"][str(n)] = speedup / row["gflops_reduction"]
            row["speedup_per_reduction_ci95"][str(n)] = [low / row["gflops_reduction"], high / row["gflops_reduction"]]


def _environment(threads: list[int]) -> dict:
    from yoloslim.utils.machine import cpu_name, cpu_vector_isa

    return {
        "cpu": cpu_name(),
        "cpu_vector_isa": cpu_vector_isa(),
        "cores": os.cpu_count(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "onnxruntime_threads": threads,
        **{m: __import__(m).__version__ for m in ("onnxruntime", "torch", "ultralytics", "torch_pruning")},
        "python": platform.python_version(),
    }


def _settings(args) -> dict:
    keys = ("imgsz", "target_flops", "round_to", "method", "methods", "yoloslim_variants", "threads", "rounds")
    return {key: getattr(args, key) for key in keys} | {"torch_pruning_step_ratio": TP_STEP_RATIO}


def _command() -> str:
    tool = Path(sys.argv[0])
    return "python " + " ".join([tool.relative_to(ROOT).as_posix() if tool.is_absolute() else str(tool), *sys.argv[1:]])


def markdown(results: dict) -> str:
    env = results["env"]
    threads = [str(n) for n in env["onnxruntime_threads"]]
    lines = [
        "# Prune to half the GFLOPs: speed on ONNX Runtime",
        "",
        f"`{results['command']}`",
        "",
        f"ONNX Runtime {env['onnxruntime']} CPU ({env['cpu']}, {env['cpu_vector_isa']}, {env['cores']} cores, load "
        f"average {env['load_average_1min_at_end']:.1f} at the end), batch 1, p50 at {' and '.join(threads)} threads "
        f"pinned, each model's variants timed interleaved; torch-pruning {env['torch_pruning']}, ultralytics "
        f"{env['ultralytics']}. Speedup ÷ reduction is the speedup over the unpruned model divided by the GFLOPs "
        "reduction (1.00: time falls as the GFLOPs do); 95% intervals resample the timing rounds.",
        "",
        "| model | imgsz | variant | params | GFLOPs | GFLOPs ÷ | "
        + " | ".join(f"ms ({n}T) | speedup ({n}T) | speedup ÷ reduction ({n}T)" for n in threads)
        + " |",
        "| --- | ---: | --- | ---: | ---: | ---: | " + " | ".join("---: | ---: | ---" for _ in threads) + " |",
    ]
    for result in results["models"]:
        for name, row in result["variants"].items():
            label = name.replace("yoloslim", f"yoloslim ({result['yoloslim_method']})", 1)
            if name == "torch-pruning":
                label += f" ({row['steps']} steps)"
            cells = " | ".join(
                f"{row['latency_ms_p50'][n]:.2f} | {row['speedup'][n]:.2f} | "
                + ("" if name == "unpruned" else _ratio(row, n))
                for n in threads
            )
            lines.append(
                f"| {result['model']} | {result['imgsz']} | {label} | {row['params']:,} | {row['gflops']:.3f} "
                f"| {row['gflops_reduction']:.2f} | {cells} |"
            )
    return "\n".join(lines) + "\n"


def _ratio(row: dict, n: str) -> str:
    low, high = row["speedup_per_reduction_ci95"][n]
    return f"{row['speedup_per_reduction'][n]:.2f} ({low:.2f}-{high:.2f})"


if __name__ == "__main__":
    try:
        main()
    except YoloslimError as e:
        sys.exit(f"bench_torch_pruning: error: {e}")
