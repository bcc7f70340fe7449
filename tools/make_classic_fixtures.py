"""Make tests/fixtures/classic/: checkpoints written by the original YOLOv5 repository's own code, and the outputs
its own code computes from them, which tests/test_classic.py compares yoloslim's classic models against.

    python tools/make_classic_fixtures.py --yolov5 path/to/yolov5 [--python path/to/python]

--yolov5 is a git clone of github.com/ultralytics/yolov5 with its release tags; the releases used (v5.0, v6.0, v6.2,
v7.0) are extracted into a temporary folder and run from there, each in its own process, by --python: an interpreter
with the original's requirements (its requirements.txt; numpy < 2.4, which still has np.trapz for val.py). Nothing
of the original is copied into yoloslim. The script runs offline: torch.load is told to unpickle fully, as the
original expects of torch < 2.6, and the original's font check finds a font from matplotlib instead of downloading.

What it writes (tiny models, 3 classes; docs/classic-yolov5.md describes each file):
- v7.0-best.pt: yolov5n.yaml at width 1/32, trained one epoch by v7.0's train.py on a generated dataset, from
  weights with randomised BatchNorm statistics (so that every parameter shapes the outputs); train.py strips it.
- v6.2-last.pt: a minimal layout (Convs, two detection levels), saved as v6.2's train.py saves last.pt mid-training
  (model, EMA, optimizer state, numpy best_fitness, opt with paths, wandb_id), after one optimizer step.
- v6.0-best.pt and v5.0-best.pt (Focus, BottleneckCSP, SPP): small layouts saved as those releases' train.py saves
  a checkpoint, then stripped by their strip_optimizer.
- v7.0-segment.pt, v7.0-classify.pt, v7.0-ghost.pt: what yoloslim refuses (other tasks, modules it does not
  implement), saved as v7.0's segment/, classify/ and train.py save them, stripped.
- inputs.npz: the test images; <checkpoint>.npz: per image, the eval-mode boxes and the training-mode raw maps,
  and per-tensor sums of the model that v7.0's code builds from the checkpoint's yaml after torch.manual_seed(0).
- val/ (--only val writes it alone): a few generated images with labels and a data.yaml; v7.0-val.pt, yolov5n.yaml
  at width 1/16 trained from scratch by v7.0's train.py on other generated images of the same kind; val.json, the
  metrics that v7.0's val.py reports for that model on those images with its defaults, which
  tests/test_classic_deploy.py compares `yoloslim eval` against.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RELEASES = ("v5.0", "v6.0", "v6.2", "v7.0")
IMAGE_SHAPES = ((1, 3, 64, 64), (2, 3, 32, 64))  # (batch, channels, height, width)
ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]

# Small layouts, width 1/32. SMALL has every module of the v6.0+ layouts, C3 repeated, and two detection levels;
# SMALL_OLD the same with the earlier Focus, BottleneckCSP and SPP; MINIMAL (plain Convs) is for checkpoints whose
# layers matter less than what else they hold.
SMALL = {
    "nc": 3,
    "depth_multiple": 0.33,
    "width_multiple": 0.03125,
    "anchors": ANCHORS[1:],
    "backbone": [
        [-1, 1, "Conv", [64, 6, 2, 2]],
        [-1, 1, "Conv", [128, 3, 2]],
        [-1, 6, "C3", [128]],
        [-1, 1, "Conv", [256, 3, 2]],
        [-1, 1, "Conv", [512, 3, 2]],
        [-1, 1, "SPPF", [512, 5]],
    ],
    "head": [
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 3], 1, "Concat", [1]],
        [-1, 3, "C3", [256, False]],
        [[8, 5], 1, "Detect", ["nc", "anchors"]],
    ],
}
SMALL_OLD = {
    **SMALL,
    "backbone": [
        [-1, 1, "Focus", [64, 3]],
        [-1, 1, "Conv", [128, 3, 2]],
        [-1, 6, "BottleneckCSP", [128]],
        [-1, 1, "Conv", [256, 3, 2]],
        [-1, 1, "Conv", [512, 3, 2]],
        [-1, 1, "SPP", [512, [5, 9, 13]]],
    ],
}
MINIMAL = {
    **SMALL,
    "anchors": ANCHORS[:2],
    "backbone": [[-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 1, "Conv", [256, 3, 2]]],
    "head": [[-1, 1, "Conv", [512, 3, 2]], [[2, 3], 1, "Detect", ["nc", "anchors"]]],
}
MINIMAL_SEGMENT = {**MINIMAL, "head": [MINIMAL["head"][0], [[2, 3], 1, "Segment", ["nc", "anchors", 8, 64]]]}
MINIMAL_GHOST = {**MINIMAL, "head": [[-1, 1, "GhostConv", [512, 3, 2]], MINIMAL["head"][1]]}
LAYOUTS = {"small": SMALL, "old": SMALL_OLD, "minimal": MINIMAL, "segment": MINIMAL_SEGMENT, "ghost": MINIMAL_GHOST}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--yolov5", type=Path, required=True, help="git clone of github.com/ultralytics/yolov5")
    parser.add_argument("--python", default=sys.executable, help="interpreter with the original's requirements")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "classic")
    parser.add_argument(
        "--only", choices=("checkpoints", "val"), help="write only the checkpoint fixtures, or only val/ (default both)"
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # a job run inside an extracted release
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(Path.cwd()))  # the release's `models` and `utils` packages
        WORKER_JOBS[args.worker[0]](*args.worker[1:])
        return
    with tempfile.TemporaryDirectory(prefix="classic-fixtures-") as tmp:
        repo, out, tmp = args.yolov5.resolve(), args.out.resolve(), Path(tmp)
        run = Runner(args.python, offline_config_dir(tmp / "config"))
        if args.only != "val":
            make_fixtures(repo, run, out, tmp)
        if args.only != "checkpoints":
            make_val_fixture(extract_release(repo, "v7.0", tmp / "val-v7.0"), run, out / "val", tmp / "val-work")
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            print(f"{path.stat().st_size:>8}  {path}")


def make_fixtures(repo: Path, run: Runner, out: Path, tmp: Path) -> None:
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    releases = {tag: extract_release(repo, tag, tmp / tag) for tag in RELEASES}
    yamls = {name: write_json(tmp / f"{name}.json", spec) for name, spec in LAYOUTS.items()}

    rng = np.random.default_rng(0)
    images = {f"image{i}": rng.integers(0, 256, shape, dtype=np.uint8) for i, shape in enumerate(IMAGE_SHAPES)}
    np.savez_compressed(out / "inputs.npz", **images)

    train_v70(run, releases["v7.0"], tmp, out / "v7.0-best.pt")
    run.job(releases["v6.2"], "last", yamls["minimal"], out / "v6.2-last.pt")
    run.job(releases["v6.0"], "best", yamls["small"], out / "v6.0-best.pt", "v6.0")
    run.job(releases["v5.0"], "best", yamls["old"], out / "v5.0-best.pt", "v5.0")
    run.job(releases["v7.0"], "other_task", yamls["segment"], out / "v7.0-segment.pt", "segment")
    run.job(releases["v7.0"], "other_task", yamls["minimal"], out / "v7.0-classify.pt", "classify")
    run.job(releases["v7.0"], "other_task", yamls["ghost"], out / "v7.0-ghost.pt", "detect")
    for name, release in (("v7.0-best", "v7.0"), ("v6.2-last", "v6.2"), ("v6.0-best", "v6.0"), ("v5.0-best", "v5.0")):
        run.job(releases[release], "reference", out / f"{name}.pt", out / "inputs.npz", tmp / f"{name}-outputs.npz")
        run.job(releases["v7.0"], "fresh", out / f"{name}.pt", tmp / f"{name}-fresh.npz")
        merge_npz(out / f"{name}.npz", tmp / f"{name}-outputs.npz", tmp / f"{name}-fresh.npz")


class Runner:
    """Runs this script's worker jobs, and the original's own scripts, inside an extracted release."""

    def __init__(self, python: str, config_dir: Path):
        self.python = python
        # torch >= 2.6 would refuse the numpy scalars the original pickles; the font check would download
        self.env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "YOLOV5_CONFIG_DIR": str(config_dir)}
        # one thread: on a busy machine torch's threads wait for one another, and training slows several times over
        self.env["OMP_NUM_THREADS"] = "1"
        self.env.update(HOME=str(config_dir), PATH="/usr/bin:/bin")

    def job(self, release: Path, name: str, *args) -> None:
        self.script(release, [__file__, "--yolov5", str(release), "--worker", name, *map(str, args)])

    def script(self, release: Path, argv: list) -> None:
        print(f"[{release.name}] {' '.join(map(str, argv))}", flush=True)
        subprocess.run([self.python, *map(str, argv)], cwd=release, env=self.env, check=True)


def extract_release(repo: Path, tag: str, folder: Path) -> Path:
    """The release `tag` of the git clone `repo`, extracted into `folder`; a plain source tree is copied as it is."""
    if not (repo / ".git").exists():
        return Path(shutil.copytree(repo, folder))
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", tag], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def offline_config_dir(folder: Path) -> Path:
    import matplotlib

    folder.mkdir(parents=True)
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        shutil.copy(font, folder / name)
    return folder


def train_v70(run: Runner, release: Path, tmp: Path, out: Path) -> None:
    """yolov5n.yaml at width 1/32, one epoch of v7.0's train.py from randomised weights; its stripped best.pt."""
    import yaml

    spec = yaml.safe_load((release / "models" / "yolov5n.yaml").read_text())
    spec.update(nc=3, width_multiple=0.03125)
    cfg = tmp / "yolov5n-w32.yaml"
    cfg.write_text(yaml.safe_dump(spec, sort_keys=False))
    start = tmp / "start.pt"
    run.job(release, "start", cfg, start)
    data = synthetic_dataset(tmp / "data")
    train = ["train.py", "--img", "64", "--batch", "4", "--epochs", "1", "--data", data, "--cfg", cfg]
    train += ["--weights", start, "--device", "cpu", "--workers", "0", "--noplots", "--seed", "0"]
    run.script(release, [*train, "--project", tmp / "runs", "--name", "v7.0", "--exist-ok"])
    shutil.copy(tmp / "runs" / "v7.0" / "weights" / "best.pt", out)


def synthetic_dataset(folder: Path, **changes) -> Path:
    """A few images of yoloslim's generated demo dataset, three shape classes, in YOLO format."""
    import dataclasses

    sys.path.insert(0, str(ROOT))
    from yoloslim.data.synthetic import default_config, ensure_synthetic_dataset

    config = dataclasses.replace(
        default_config(),
        image_size=96,
        splits={"train": 8, "val": 4},
        object_size=(8, 48),
        classes=("circle", "square", "triangle"),
    )
    return ensure_synthetic_dataset(dataclasses.replace(config, **changes), root=folder)


# The val.py agreement fixture: easier images than the demo's (fewer distractors, less noise, larger objects). The
# model is trained on copies of the val images themselves (train.py's augmentation varies them): the fixture checks
# that two evaluators agree on one model's detections, which needs a model that detects in these images, and a model
# small enough to commit learns them on a CPU in minutes; it says nothing of the model's accuracy on other images.
VAL_DATA = dict(
    image_size=128,
    splits={"train": 0, "val": 12},
    object_size=(16, 72),
    objects_per_image=(1, 4),
    distractors_per_image=(0, 2),
    noise_sigma=(2.0, 5.0),
)
VAL_COPIES = 16  # copies of each val image in the training set
VAL_WIDTH = 0.0625  # yolov5n.yaml at width 1/16: 8 to 64 channels
VAL_EPOCHS = 200
# train.py's hyp.scratch-low.yaml without mosaic (which would shrink these small images' objects further), with a
# shorter warmup, and with shifts up to a quarter of the image, whose grey fill teaches the model the borders that
# val.py's rectangular batches add (trained without them, a model lost 2.4 mAP50-95 points to them)
VAL_HYP = {"mosaic": 0.0, "scale": 0.25, "translate": 0.25, "warmup_epochs": 1.0}


def make_val_fixture(release: Path, run: Runner, out: Path, tmp: Path) -> None:
    """val/: the generated val images and labels, a model v7.0's train.py trained on them, and what v7.0's val.py
    reports for it on them (its command-line defaults: conf 0.001, NMS IoU 0.6, max_det 300, rectangular batches)."""
    import yaml

    tmp.mkdir(parents=True)
    data_yaml = synthetic_dataset(tmp / "data", **VAL_DATA)
    train_yaml = training_copies(data_yaml, tmp / "train.yaml")
    spec = yaml.safe_load((release / "models" / "yolov5n.yaml").read_text())
    spec.update(nc=3, width_multiple=VAL_WIDTH)
    cfg = tmp / "yolov5n-w16.yaml"
    cfg.write_text(yaml.safe_dump(spec, sort_keys=False))
    hyp = yaml.safe_load((release / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())
    (tmp / "hyp.yaml").write_text(yaml.safe_dump({**hyp, **VAL_HYP}, sort_keys=False))
    imgsz = str(VAL_DATA["image_size"])
    train = ["train.py", "--img", imgsz, "--batch", "16", "--epochs", str(VAL_EPOCHS), "--data", train_yaml]
    train += ["--hyp", tmp / "hyp.yaml"]
    train += ["--cfg", cfg, "--weights", "", "--device", "cpu", "--workers", "0", "--noplots", "--noval"]
    run.script(release, [*train, "--seed", "0", "--project", tmp / "runs", "--name", "train", "--exist-ok"])
    copy_val_split(data_yaml.parent, out)
    shutil.copy(tmp / "runs" / "train" / "weights" / "best.pt", out / "v7.0-val.pt")
    run.job(release, "val", out / "v7.0-val.pt", data_yaml, imgsz, tmp / "runs", out / "val.json")


def training_copies(data_yaml: Path, out: Path) -> Path:
    """A dataset yaml whose train split is VAL_COPIES copies of each val image (train.py counts an image listed
    twice once), its val split the val images."""
    import yaml

    root = data_yaml.parent
    for kind, suffix in (("images", ".jpg"), ("labels", ".txt")):
        (root / kind / "copies").mkdir(parents=True)
        for source in sorted((root / kind / "val").glob(f"*{suffix}")):
            for copy in range(VAL_COPIES):
                shutil.copy(source, root / kind / "copies" / f"{source.stem}-{copy}{suffix}")
    spec = yaml.safe_load(data_yaml.read_text())
    spec.update(train="images/copies", val="images/val")
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def copy_val_split(dataset: Path, out: Path) -> None:
    """The val images and labels, and a data.yaml whose root is its own folder."""
    import yaml

    for kind in ("images", "labels"):
        shutil.copytree(dataset / kind / "val", out / kind)
    spec = yaml.safe_load((dataset / "data.yaml").read_text())
    (out / "data.yaml").write_text(yaml.safe_dump({"train": "images", "val": "images", "names": spec["names"]}))


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value))
    return path


def merge_npz(out: Path, *parts: Path) -> None:
    import numpy as np

    arrays = {}
    for part in parts:
        with np.load(part) as loaded:
            arrays.update(loaded)
    np.savez_compressed(out, **arrays)


# ---- worker jobs: run by --python inside an extracted release, with the original's packages importable ----


def _original():
    import models.yolo

    return models.yolo


def _build(spec_json: str, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return _original().Model(json.loads(Path(spec_json).read_text()))


def _randomise_batchnorms(model, seed: int = 1) -> None:
    """BatchNorm affine parameters and running statistics away from their identity start."""
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)


def _parse_opt(script: str):
    """What the release's training script's parse_opt returns with no arguments (its defaults, paths included)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"original_{Path(script).parent.name}_train", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv, sys.argv = sys.argv, [script]
    try:
        return module.parse_opt(True)
    finally:
        sys.argv = argv


def job_start(cfg_yaml: str, out: str) -> None:
    """Starting weights for train.py --weights: the yaml's model with randomised BatchNorms, as a weights file."""
    import torch
    import yaml

    torch.manual_seed(0)
    model = _original().Model(yaml.safe_load(Path(cfg_yaml).read_text()))
    _randomise_batchnorms(model)
    torch.save({"model": model.half()}, out)


def job_last(spec_json: str, out: str) -> None:
    """v6.2's last.pt after one optimizer step: model, EMA, optimizer state, numpy best_fitness, opt, wandb_id."""
    from copy import deepcopy
    from datetime import datetime

    import numpy as np
    import torch
    from utils.torch_utils import ModelEMA, de_parallel, smart_optimizer

    model = _build(spec_json)
    _randomise_batchnorms(model)
    ema = ModelEMA(model)
    ema.updates = 1000  # as far into a run as the EMA weights differ clearly from the model's
    optimizer = smart_optimizer(model, "SGD", 0.01, 0.937, 0.0005)
    model.train()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    sum(level.square().mean() for level in model(images)).backward()
    optimizer.step()
    ema.update(model)
    ckpt = {
        "epoch": 0,
        "best_fitness": np.array([0.0123]),
        "model": deepcopy(de_parallel(model)).half(),
        "ema": deepcopy(ema.ema).half(),
        "updates": ema.updates,
        "optimizer": optimizer.state_dict(),
        "wandb_id": None,
        "opt": vars(_parse_opt("train.py")),
        "date": datetime.now().isoformat(),
    }
    torch.save(ckpt, out)


def job_best(spec_json: str, out: str, release: str) -> None:
    """A checkpoint as v6.0's or v5.0's train.py saves it, then finalised by that release's strip_optimizer."""
    from copy import deepcopy

    import numpy as np
    import torch
    from utils.general import strip_optimizer
    from utils.torch_utils import ModelEMA

    model = _build(spec_json)
    _randomise_batchnorms(model)
    ema = ModelEMA(model)
    ckpt = {"epoch": 0, "best_fitness": np.array([0.0123]), "model": deepcopy(model).half()}
    ckpt.update(ema=deepcopy(ema.ema).half(), updates=ema.updates, optimizer=None, wandb_id=None)
    if release == "v5.0":
        ckpt["training_results"] = ""
    torch.save(ckpt, out)
    strip_optimizer(out)


def job_other_task(spec_json: str, out: str, task: str) -> None:
    """A segmentation, classification or ghost-module checkpoint as v7.0's training scripts save them, stripped."""
    from copy import deepcopy
    from datetime import datetime

    import torch
    from utils.general import strip_optimizer

    yolo = _original()
    torch.manual_seed(0)
    spec = json.loads(Path(spec_json).read_text())
    script = {"segment": "segment/train.py", "classify": "classify/train.py", "detect": "train.py"}[task]
    if task == "segment":
        model = yolo.SegmentationModel(spec)
    elif task == "classify":
        model = yolo.ClassificationModel(model=yolo.DetectionModel(spec), nc=3, cutoff=3)
    else:
        model = yolo.DetectionModel(spec)
    ckpt = {"epoch": 0, "best_fitness": 0.0, "model": deepcopy(model).half(), "ema": None, "updates": 0}
    ckpt.update(optimizer=None, opt=vars(_parse_opt(script)), git={}, date=datetime.now().isoformat())
    torch.save(ckpt, out)
    strip_optimizer(out)


def job_reference(weights: str, inputs: str, out: str) -> None:
    """The release's own outputs for each test image: eval-mode boxes, training-mode raw maps."""
    from copy import deepcopy

    import numpy as np
    import torch

    _original()
    ckpt = torch.load(weights, map_location="cpu")
    model = (ckpt.get("ema") or ckpt["model"]).float().eval()  # what the original's attempt_load uses
    outputs = {}
    with np.load(inputs) as images, torch.no_grad():
        for name in images.files:
            x = torch.from_numpy(images[name]).float() / 255
            boxes, _ = model(x)
            outputs[f"{name}_boxes"] = boxes.numpy()
            for level, raw in enumerate(deepcopy(model).train()(x)):
                outputs[f"{name}_train{level}"] = raw.numpy()
            conf = boxes[..., 4]
            print(f"  {name}: objectness {conf.min():.3f}..{conf.max():.3f}, boxes up to {boxes[..., :4].max():.1f}")
    np.savez(out, **outputs)


def job_fresh(weights: str, out: str) -> None:
    """Per-tensor sums of the model that v7.0's code builds from the checkpoint's yaml after torch.manual_seed(0)."""
    import numpy as np
    import torch

    yolo = _original()
    spec = torch.load(weights, map_location="cpu")["model"].yaml
    torch.manual_seed(0)
    state = yolo.DetectionModel(spec).state_dict()
    np.savez(
        out,
        fresh_names=np.array(list(state)),
        fresh_sum=np.array([v.double().sum().item() for v in state.values()]),
        fresh_abs=np.array([v.double().abs().sum().item() for v in state.values()]),
    )


def job_val(weights: str, data: str, imgsz: str, project: str, out: str) -> None:
    """v7.0's val.py as its command line runs it with these options (every other at its default); its metrics."""
    import val

    argv, sys.argv = sys.argv, ["val.py", "--weights", weights, "--data", data, "--img", imgsz, "--device", "cpu"]
    sys.argv += ["--batch-size", "8", "--workers", "0", "--project", project, "--name", "val", "--exist-ok"]
    try:
        opt = val.parse_opt()
    finally:
        sys.argv = argv
    (precision, recall, map50, map50_95, *_), _, _ = val.run(**vars(opt))
    options = {k: opt.__dict__[k] for k in ("imgsz", "batch_size", "conf_thres", "iou_thres", "max_det", "task")}
    metrics = {"map50": map50, "map": map50_95, "precision": precision, "recall": recall}
    # The same run with the loader of val.py's speed task (every image letterboxed to the square imgsz, no padding
    # beyond it), which is what yoloslim feeds; the default letterboxes each batch to a rectangle half a stride wider.
    (_, _, square50, square50_95, *_), _, _ = val.run(**{**vars(opt), "task": "speed", "name": "square"})
    metrics.update(square_map50=square50, square_map=square50_95)
    write_json(Path(out), {**{k: float(v) for k, v in metrics.items()}, "val.py": options, "release": "v7.0"})
    print(f"  val.py: mAP50 {map50:.4f}, mAP50-95 {map50_95:.4f}; square: {square50:.4f}, {square50_95:.4f}")
    original_nms(weights, Path(data).parent / "images" / "val", int(imgsz), Path(out).with_name("nms.npz"))


NMS_VAL_IMAGES = 3  # images whose val.py-setting detections (up to 300 each) are recorded too


def original_nms(weights: str, images: Path, imgsz: int, out: Path) -> None:
    """The detections of the original's own pipeline on each image, in image pixels as rows (x1, y1, x2, y2,
    confidence, class): `detect_<image>` as its detect.py computes them with its defaults (loader, letterbox, fused
    model, NMS conf 0.25, IoU 0.45, max_det 1000), before it rounds them; `val_<image>` with val.py's NMS settings
    (conf 0.001, IoU 0.6, multi-label, max_det 300) for the first NMS_VAL_IMAGES images."""
    import numpy as np
    import torch
    from models.common import DetectMultiBackend
    from utils.dataloaders import LoadImages
    from utils.general import non_max_suppression, scale_boxes

    model = DetectMultiBackend(weights, device=torch.device("cpu"))
    found = {}
    for i, (path, im, im0, _, _) in enumerate(LoadImages(str(images), img_size=imgsz, stride=model.stride)):
        x = torch.from_numpy(im).float()[None] / 255
        with torch.no_grad():
            pred = model(x)
        settings = {"detect": dict(conf_thres=0.25, iou_thres=0.45, max_det=1000)}
        if i < NMS_VAL_IMAGES:
            settings["val"] = dict(conf_thres=0.001, iou_thres=0.6, multi_label=True, max_det=300)
        for kind, options in settings.items():
            det = non_max_suppression(pred, **options)[0]
            det[:, :4] = scale_boxes(x.shape[2:], det[:, :4], im0.shape)  # not rounded, as detect.py does to draw
            found[f"{kind}_{Path(path).stem}"] = det.numpy()
    np.savez_compressed(out, **found)
    print(f"  detections recorded: {', '.join(f'{k} {len(v)}' for k, v in found.items())}")


WORKER_JOBS = {
    "start": job_start,
    "last": job_last,
    "best": job_best,
    "other_task": job_other_task,
    "reference": job_reference,
    "fresh": job_fresh,
    "val": job_val,
}

if __name__ == "__main__":
    main()
