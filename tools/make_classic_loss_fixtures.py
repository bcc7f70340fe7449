"""Make tests/fixtures/classic/loss-*.npz: the training loss and target assignment of the original YOLOv5 repository's
own code (v7.0's utils/loss.py ComputeLoss and its build_targets) on fixed batches, which tests/test_classic_loss.py
compares yoloslim's classic loss (yoloslim/models/loss.py) against.

    python tools/make_classic_loss_fixtures.py --yolov5 path/to/yolov5 [--python path/to/python]

As tools/make_classic_fixtures.py (whose helpers it uses): --yolov5 is a git clone of github.com/ultralytics/yolov5
with its release tags, v7.0 is extracted into a temporary folder and run there by --python, an interpreter with the
original's requirements. Nothing of the original is copied into yoloslim.

Per case (a committed classic checkpoint and a batch) the file holds: the batch's labels; the model's training-mode
raw maps for fixed random images (the loss is computed from these, so a test needs no forward pass); the loss gains
that v7.0's train.py derives from hyp.scratch-low.yaml for the model's classes and levels and the image size; the
loss, its (box, obj, cls) parts and its gradient with respect to each map; and per level the assigned targets
(image, anchor, cell row and column, box in cells, anchor size, class) in build_targets' order.

The labels hold the edge cases of the assignment: centres just either side of half a cell, on cell borders, in the
first and last cells and on the image's right and lower edges (whose cell index is clamped), boxes too small, too
large or too elongated for every anchor, two labels on the same cell and anchor, images without labels, and an empty
batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_classic_fixtures import Runner, extract_release, offline_config_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMGSZ = 64  # the training image size the gains are scaled for
# label rows: image, class, centre x, centre y, width, height (normalised)
EDGE_LABELS = [
    [0, 0, 0.50, 0.50, 0.30, 0.40],  # centre on a border of every level's cells
    [0, 1, 0.26, 0.74, 0.10, 0.12],  # just over half a cell on the finest level
    [0, 2, 0.2480, 0.7520, 0.20, 0.10],  # just under half a cell
    [0, 1, 0.0, 0.0, 0.05, 0.05],  # top-left corner: no neighbour outside the map
    [0, 2, 1.0, 1.0, 0.25, 0.25],  # bottom-right corner: the cell index is clamped
    [0, 0, 0.97, 0.03, 0.06, 0.08],  # first row, last column
    [1, 0, 0.40, 0.60, 0.002, 0.002],  # too small for every anchor
    [1, 1, 0.50, 0.50, 1.00, 0.02],  # too elongated for every anchor
    [1, 2, 0.12, 0.37, 0.90, 0.95],  # large: the coarsest level only
    [1, 2, 0.12, 0.37, 0.80, 0.85],  # same cells and anchors as the previous label
    [3, 1, 0.6875, 0.3125, 0.15, 0.35],  # on the finest level's half-cell lines
    [3, 0, 0.93, 0.91, 0.45, 0.30],
]  # image 2 has no labels
CASES = {
    # name: (checkpoint, batch shape (images, channels, height, width), labels or a seed for random ones)
    "edges": ("v7.0-best.pt", (4, 3, 64, 64), EDGE_LABELS),
    "random": ("v7.0-best.pt", (3, 3, 64, 96), 1),
    "empty": ("v7.0-best.pt", (2, 3, 64, 64), []),
    "two-levels": ("v6.0-best.pt", (2, 3, 64, 64), 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--yolov5", type=Path, required=True, help="git clone of github.com/ultralytics/yolov5")
    parser.add_argument("--python", default=sys.executable, help="interpreter with the original's requirements")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "classic")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # weights, case json, out: run inside v7.0
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(Path.cwd()))  # the release's `models` and `utils` packages
        job_loss(*args.worker)
        return
    with tempfile.TemporaryDirectory(prefix="classic-loss-fixtures-") as tmp:
        tmp = Path(tmp)
        release = extract_release(args.yolov5.resolve(), "v7.0", tmp / "v7.0")
        run = Runner(args.python, offline_config_dir(tmp / "config"))
        out = args.out.resolve()
        for name, (weights, shape, labels) in CASES.items():
            case = tmp / f"{name}.json"
            case.write_text(json.dumps({"shape": shape, "labels": labels}))
            target = out / f"loss-{name}.npz"
            run.script(release, [__file__, "--yolov5", release, "--worker", out / weights, case, target])
            print(f"{target.stat().st_size:>8}  {target}")


def random_labels(seed: int, images: int, per_image: int = 6):
    """Labels spread over the images and sizes, from the seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = images * per_image
    image = np.repeat(np.arange(images), per_image)
    cls = rng.integers(0, 3, n)
    wh = rng.uniform(0.02, 0.9, (n, 2))
    xy = rng.uniform(wh / 2, 1 - wh / 2)
    return np.column_stack((image, cls, xy, wh)).tolist()


def job_loss(weights: str, case_json: str, out: str) -> None:
    """Run inside v7.0: the loss, its gradient and the assigned targets of ComputeLoss for one case."""
    import numpy as np
    import torch
    import yaml
    from utils.loss import ComputeLoss

    case = json.loads(Path(case_json).read_text())
    model = torch.load(weights, map_location="cpu")["model"].float().train()
    head = model.model[-1]
    batch, channels, height, width = case["shape"]
    labels = case["labels"]
    labels = random_labels(labels, batch) if isinstance(labels, int) else labels
    targets = torch.tensor(labels, dtype=torch.float32).view(-1, 6)

    hyp = yaml.safe_load(Path("data/hyps/hyp.scratch-low.yaml").read_text())
    hyp["box"] *= 3 / head.nl  # as v7.0's train.py scales them
    hyp["cls"] *= head.nc / 80 * 3 / head.nl
    hyp["obj"] *= (IMGSZ / 640) ** 2 * 3 / head.nl
    hyp["label_smoothing"] = 0.0
    model.hyp = hyp

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, channels, height, width, generator=generator)
    raw = [level.detach().requires_grad_() for level in model(images)]
    compute_loss = ComputeLoss(model)
    loss, parts = compute_loss(raw, targets)
    loss.sum().backward()
    tcls, tbox, indices, anchors = compute_loss.build_targets(raw, targets)

    arrays = {
        "targets": targets.numpy(),
        "imgsz": np.array(IMGSZ),
        "gains": np.array([hyp["box"], hyp["obj"], hyp["cls"], hyp["anchor_t"]]),
        "loss": loss.detach().numpy(),
        "parts": parts.numpy(),
    }
    for i, level in enumerate(raw):
        arrays[f"raw{i}"] = level.detach().numpy()
        arrays[f"grad{i}"] = level.grad.numpy()
        image, anchor, gy, gx = indices[i]
        arrays[f"assigned{i}"] = torch.stack((image, anchor, gy, gx, tcls[i])).numpy()
        arrays[f"box{i}"] = tbox[i].numpy()
        arrays[f"anchor_wh{i}"] = anchors[i].numpy()
    np.savez_compressed(out, **arrays)
    print(f"  loss {loss.item():.6f}, parts {parts.tolist()}, assigned {[len(t) for t in tcls]}")


if __name__ == "__main__":
    main()
