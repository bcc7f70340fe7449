"""Prune checkpoints of the original YOLOv5 repository with yoloslim, then check the results outside the test suite:
the original repository's own code loads and runs each pruned file, and its ONNX model's speedup on ONNX Runtime at
one thread is set against its GFLOPs reduction.

    python tools/check_classic_prune.py --yolov5 path/to/yolov5 --python path/to/orig/python [--weights best.pt ...]

--yolov5 is a git clone of github.com/ultralytics/yolov5 with its release tags (--tag, v7.0 by default, is extracted
into a temporary folder with git archive), or a source tree of one release (copied into a temporary folder); the
clone is never changed. --python is an interpreter with the original's requirements (docs/classic-yolov5.md, "How
the test fixtures were made"). Without --weights, the original's code builds a yolov5n from its own
models/yolov5n.yaml (80 classes, BatchNorm scales drawn in [0, 1) so that the bn criterion has something to rank).

For each checkpoint:
1. `yoloslim prune`'s API prunes it (--target-flops 0.5 and the other options of PruneConfig).
2. In the original's interpreter and release: models.experimental.attempt_load reads the pruned file and runs it on
   a random image (compared with yoloslim's own reading of the file); detect.py, val.py (on a few generated images)
   and export.py --include onnx run on it.
3. Both models, unpruned and pruned, are exported to ONNX (torch.onnx.export, the eval-mode boxes output) and timed
   with ONNX Runtime at one thread, interleaved round by round, the process pinned to one core: speedup of the median
   latency, its 95% interval over rounds, and the speedup divided by the GFLOPs reduction.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_classic_fixtures import extract_release, offline_config_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--yolov5", type=Path, required=True, help="git clone (or source tree) of the original")
    parser.add_argument("--tag", default="v7.0", help="release to run, when --yolov5 is a git clone")
    parser.add_argument("--python", default=sys.executable, help="interpreter with the original's requirements")
    parser.add_argument(
        "--extra-path",
        type=Path,
        help="folder put on the original's PYTHONPATH: the onnxscript and onnx_ir packages (pip install --target "
        "DIR --no-deps onnxscript onnx_ir), without which torch >= 2.9 fails the original export.py",
    )
    parser.add_argument("--weights", type=Path, nargs="*", default=[], help="checkpoints (default: a built yolov5n)")
    parser.add_argument("--target-flops", type=float, default=0.5)
    parser.add_argument("--method", default="bn", choices=("bn", "l1"))
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--imgsz", type=int, help="size of the GFLOPs and the timing (default: the training size)")
    parser.add_argument("--rounds", type=int, default=30, help="timing rounds of 5 calls per model")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # a job run inside the extracted release
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(Path.cwd()))  # the release's `models` and `utils` packages
        WORKER_JOBS[args.worker[0]](*args.worker[1:])
        return
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="check-classic-prune-") as tmp:
        reports = check_all(args, Path(tmp))
    print(json.dumps(reports, indent=2))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))


def check_all(args, tmp: Path) -> list[dict]:
    release = extract_release(args.yolov5.resolve(), args.tag, tmp / "release")
    run = Runner(args.python, offline_config_dir(tmp / "config"), release, args.extra_path)
    weights = list(args.weights)
    if not weights:
        weights = [tmp / "yolov5n.pt"]
        run.job("build", release / "models" / "yolov5n.yaml", weights[0])
    return [check_one(run, w.resolve(), args, tmp / f"{i}-{w.stem}") for i, w in enumerate(weights)]


def check_one(run: Runner, weights: Path, args, folder: Path) -> dict:
    import numpy as np

    from yoloslim.models import load_classic_checkpoint
    from yoloslim.prune import PruneConfig, prune

    folder.mkdir(parents=True)
    base, ckpt = load_classic_checkpoint(weights)
    imgsz = args.imgsz or _training_size(ckpt)
    config = PruneConfig(target_flops=args.target_flops, method=args.method, round_to=args.round_to, imgsz=imgsz)
    result = prune(weights, config, out=folder / f"{weights.stem}-pruned.pt")
    print(f"pruned {weights} -> {result.out}: GFLOPs {result.before['gflops']} -> {result.after['gflops']}", flush=True)

    image = folder / "image.npy"
    np.save(image, np.random.default_rng(SEED).random((1, 3, imgsz, imgsz), dtype=np.float32))
    original_boxes = folder / "original-boxes.npy"
    run.job("attempt_load", result.out, image, original_boxes)
    ours, _ = load_classic_checkpoint(result.out)
    difference = _relative_difference(_boxes(ours, np.load(image)), np.load(original_boxes))
    data = synthetic_dataset(folder / "data", base.model[-1].nc)
    single_class = base.model[-1].nc > len(SHAPES)  # more classes than the generated shapes: val.py --single-cls
    copy = Path(shutil.copy(weights, folder / weights.name))  # export.py writes beside its input
    scripts = {
        name: run_original_scripts(run, path, data, single_class, folder / name)
        for name, path in (("base", copy), ("pruned", result.out))
    }

    onnx = {
        name: export_onnx(model, imgsz, folder / f"{name}.onnx") for name, model in (("base", base), ("pruned", ours))
    }
    timing = time_onnx(onnx, imgsz, args.rounds)
    reduction = result.before["gflops"] / result.after["gflops"]
    return {
        "weights": str(weights),
        "imgsz": imgsz,
        "classes": base.model[-1].nc,
        "gflops": [result.before["gflops"], result.after["gflops"]],
        "params": [result.before["params"], result.after["params"]],
        "gflops_reduction": round(reduction, 3),
        "original_attempt_load_vs_yoloslim_max_relative_difference": difference,
        "original_scripts": scripts,
        **timing,
        "speedup_over_reduction": round(timing["speedup"] / reduction, 3),
    }


def _training_size(ckpt: dict) -> int:
    opt = ckpt.get("opt") or {}
    size = (opt if isinstance(opt, dict) else vars(opt)).get("imgsz", 640)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _boxes(model, image):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(image))[0].numpy()


def _relative_difference(found, expected) -> float:
    import numpy as np

    return float(np.abs(found - expected).max() / np.abs(expected).max())


def run_original_scripts(run: Runner, weights: Path, data: Path, single_class: bool, folder: Path) -> dict:
    """detect.py, val.py and export.py of the original on a checkpoint: each one's exit status and last lines."""
    image = next((data.parent / "images" / "val").glob("*.jpg"))
    common = ["--weights", weights, "--imgsz", "320", "--device", "cpu"]
    project = ["--project", folder, "--exist-ok"]
    single = ["--single-cls"] if single_class else []
    commands = {
        "detect.py": ["detect.py", *common, "--source", image, *project, "--name", "detect"],
        "val.py": ["val.py", *common, "--data", data, "--batch-size", "4", *single, *project, "--name", "val"],
        "export.py": ["export.py", *common, "--include", "onnx"],
    }
    return {name: run.script(argv) for name, argv in commands.items()}


SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")


def synthetic_dataset(folder: Path, classes: int) -> Path:
    """A few images of yoloslim's generated dataset, with the model's number of classes (up to six shapes)."""
    import dataclasses

    from yoloslim.data.synthetic import default_config, ensure_synthetic_dataset

    shapes = SHAPES[: min(classes, len(SHAPES))]
    config = dataclasses.replace(default_config(), image_size=320, splits={"train": 4, "val": 8}, classes=shapes)
    return ensure_synthetic_dataset(config, root=folder)


def export_onnx(model, imgsz: int, path: Path) -> Path:
    """The eval-mode boxes output (every anchor's box, objectness and class scores) as an ONNX model, checked
    against the model in PyTorch."""
    import numpy as np
    import onnxruntime as ort
    import torch

    class Boxes(torch.nn.Module):
        def __init__(self, detector):
            super().__init__()
            self.detector = detector

        def forward(self, x):
            return self.detector(x)[0]

    model = model.float().eval()
    x = torch.from_numpy(np.random.default_rng(SEED).random((1, 3, imgsz, imgsz), dtype=np.float32))
    wrapped = Boxes(model).eval()  # the export restores the wrapper's mode to its own modules afterwards
    torch.onnx.export(wrapped, (x,), str(path), opset_version=17, input_names=["images"], dynamo=False)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    difference = _relative_difference(got, _boxes(model, x.numpy()))
    if difference > 1e-4:
        raise RuntimeError(f"{path} differs from the model in PyTorch by {difference:.2e} of the output's scale")
    return path


def time_onnx(models: dict, imgsz: int, rounds: int) -> dict:
    """Model-only latency at one ONNX Runtime thread, the process pinned to one core, base and pruned interleaved."""
    import numpy as np

    from yoloslim.runtime.backends import OnnxRuntimeBackend
    from yoloslim.utils.timing import compare_latency, speedup_interval

    core = min(os.sched_getaffinity(0))
    pinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        x = np.random.default_rng(SEED).random((1, 3, imgsz, imgsz), dtype=np.float32)
        backends = {name: OnnxRuntimeBackend(str(path), threads=1) for name, path in models.items()}
        timed = compare_latency({n: lambda b=b: b(x) for n, b in backends.items()}, rounds=rounds, per_round=5)
    finally:
        os.sched_setaffinity(0, pinned)
    base, pruned = timed["base"], timed["pruned"]
    return {
        "p50_ms": [round(base.p50_ms, 2), round(pruned.p50_ms, 2)],
        "speedup": round(base.p50_ms / pruned.p50_ms, 3),
        "speedup_95": [round(v, 3) for v in speedup_interval(base, pruned)],
        "core": core,
    }


class Runner:
    """Runs this script's worker jobs, and the original's own scripts, inside the extracted release."""

    def __init__(self, python: str, config_dir: Path, release: Path, extra_path: Path | None = None):
        self.python, self.release = python, release
        # torch >= 2.6 would refuse the numpy scalars the original pickles; the font check would download
        self.env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "YOLOV5_CONFIG_DIR": str(config_dir)}
        self.env.update(HOME=str(config_dir), PATH="/usr/bin:/bin")
        if extra_path:
            self.env["PYTHONPATH"] = str(extra_path.resolve())

    def job(self, name: str, *args) -> None:
        done = self.script([__file__, "--yolov5", self.release, "--worker", name, *args])
        if done["exit"]:
            raise RuntimeError(f"the worker job {name} failed: {done['last_line']}")

    def script(self, argv: list) -> dict:
        print(f"[{self.release.name}] {' '.join(map(str, argv))}", flush=True)
        done = subprocess.run(
            [self.python, *map(str, argv)], cwd=self.release, env=self.env, capture_output=True, text=True
        )
        text = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)  # the original colours its log
        lines = [line for line in text.splitlines() if line.strip()]
        print("\n".join(f"    {line}" for line in lines[-6:]), flush=True)
        results = [
            line.strip() for line in lines if line.split()[0] in ("all", "image", "ONNX:")
        ]  # val, detect, export
        return {"exit": done.returncode, "last_line": lines[-1] if lines else "", "results": results[-2:]}


# -- jobs run by the original's interpreter, inside its release ------------------------------------------------------


def job_build(cfg: str, out: str) -> None:
    """The original's model of `cfg`, BatchNorm scales drawn in [0, 1), saved as its train.py saves a best.pt."""
    from copy import deepcopy
    from datetime import datetime

    import torch
    from models.yolo import Model
    from torch import nn

    torch.manual_seed(SEED)
    model = Model(cfg)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.0, 1.0)
    model = deepcopy(model).half()
    for p in model.parameters():
        p.requires_grad = False
    keys = dict(epoch=-1, best_fitness=None, model=model, ema=None, updates=None, optimizer=None)
    torch.save({**keys, "opt": {"imgsz": 640}, "git": {}, "date": datetime.now().isoformat()}, out)


def job_attempt_load(weights: str, image: str, out: str) -> None:
    """The original's own loader reads the pruned file, fuses it and runs it; none of yoloslim is imported."""
    import numpy as np
    import torch
    from models.experimental import attempt_load

    model = attempt_load(weights, torch.device("cpu"))  # fused; the device is the second argument in every release
    with torch.no_grad():
        boxes = model(torch.from_numpy(np.load(image)))[0]
    modules = sorted({f"{type(m).__module__}.{type(m).__name__}" for m in model.modules()})
    assert not [m for m in sys.modules if m.startswith("yoloslim")], "yoloslim was imported"
    print(f"attempt_load: {type(model).__name__}, boxes {tuple(boxes.shape)}, modules {modules}")
    np.save(out, boxes.numpy())


WORKER_JOBS = {"build": job_build, "attempt_load": job_attempt_load}

if __name__ == "__main__":
    main()
