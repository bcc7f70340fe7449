"""Per-step time overhead of sparsity training against plain Ultralytics training, measured in the same run.

    python tools/bench_sparsity_overhead.py [--weights best.pt] [--data data.yaml] [--steps 30] [--threads 2]

Both trainers are set up on the same weights and data; their training steps (forward, backward, optimizer step,
EMA update, and for SparsityTrainer the gamma penalty) alternate on the same batches so machine noise hits both alike.
The per-epoch extras of SparsityTrainer (gamma statistics, histogram, staged checkpoint writes) are timed separately.
Writes runs/bench/sparsity_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="detection checkpoint (default: the shipped baseline)")
    parser.add_argument("--data", help="dataset yaml (default: the embedded synthetic dataset)")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "sparsity_overhead"))
    args = parser.parse_args()

    from ultralytics.models.yolo.detect import DetectionTrainer

    from yoloslim.data import resolve_data
    from yoloslim.sparsity import SparsityConfig, SparsityTrainer
    from yoloslim.utils.assets import BASELINE, shipped_file
    from yoloslim.utils.machine import cpu_name

    torch.set_num_threads(args.threads)  # Ultralytics may have lowered it on import; pin and record it
    weights = str(args.weights or shipped_file("weights", BASELINE))
    data = str(resolve_data(args.data))
    sparsity = SparsityConfig()  # the penalty's cost per step does not depend on its strength
    common = dict(
        model=weights,
        data=data,
        imgsz=args.imgsz,
        batch=args.batch,
        nbs=args.batch,
        workers=0,
        plots=False,
        verbose=False,
        project=str(Path(args.out).parent / "work"),
        exist_ok=True,
        warmup_epochs=0,
    )
    trainers = {
        "ultralytics": DetectionTrainer(overrides=dict(common, name="plain")),
        "yoloslim": SparsityTrainer(overrides=dict(common, name="sparse"), sparsity=sparsity),
    }
    for trainer in trainers.values():
        trainer._setup_train()
        trainer.epoch, trainer.sr = 0, sparsity.sr
        trainer.metrics, trainer.train_time_start = {}, time.time()
    torch.set_num_threads(args.threads)
    batches = [b for _, b in zip(range(args.steps + args.warmup), _cycle(trainers["ultralytics"].train_loader))]

    times = {name: [] for name in trainers}
    for i, batch in enumerate(batches):
        for name in list(trainers) if i % 2 == 0 else list(trainers)[::-1]:  # alternate who goes first
            elapsed = _time_step(trainers[name], batch)
            if i >= args.warmup:
                times[name].append(elapsed)
    epoch_extras = _time_epoch_extras(trainers["yoloslim"], trainers["ultralytics"])

    median = {name: float(np.median(t)) for name, t in times.items()}
    result = {
        "overhead_per_step": median["yoloslim"] / median["ultralytics"] - 1,
        "step_seconds_median": median,
        "step_seconds_p90": {name: float(np.quantile(t, 0.9)) for name, t in times.items()},
        "steps": args.steps,
        "epoch_extras_seconds": epoch_extras,
        "steps_per_epoch": len(trainers["ultralytics"].train_loader),
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"weights": weights, "data": data},
        "torch_threads": torch.get_num_threads(),
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "ultralytics": __import__("ultralytics").__version__,
        },
        "command": "python " + " ".join(sys.argv),
    }
    _write(result, Path(args.out))


def _cycle(loader):
    while True:
        yield from loader


def _time_step(trainer, batch) -> float:
    t0 = time.perf_counter()
    batch = trainer.preprocess_batch(dict(batch))
    loss, _ = trainer.model(batch)
    trainer.scaler.scale(loss.sum()).backward()
    trainer.optimizer_step()
    return time.perf_counter() - t0


def _time_epoch_extras(sparse, plain) -> dict:
    """Once per epoch SparsityTrainer also computes gamma statistics and stages its checkpoint writes."""
    out = {}
    for name, trainer in (("ultralytics", plain), ("yoloslim", sparse)):
        trainer.fitness = trainer.best_fitness = 0.0
        t0 = time.perf_counter()
        trainer.save_model()
        trainer.save_metrics({})
        out[name] = time.perf_counter() - t0
    return out


def _write(result: dict, out: Path) -> None:
    from yoloslim.utils.files import write_text_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".json"), json.dumps(result, indent=2))
    med = result["step_seconds_median"]
    extras = result["epoch_extras_seconds"]
    per_epoch = (extras["yoloslim"] - extras["ultralytics"]) / (med["ultralytics"] * result["steps_per_epoch"])
    md = [
        "# Sparsity training overhead",
        "",
        f"`{result['command']}`  (torch threads: {result['torch_threads']}, {result['env']['cores']} cores)",
        "",
        "| | Ultralytics | yoloslim | overhead |",
        "| --- | ---: | ---: | ---: |",
        f"| training step, median s | {med['ultralytics']:.4f} | {med['yoloslim']:.4f} "
        f"| {result['overhead_per_step']:+.2%} |",
        f"| once per epoch (checkpoint + metrics), s | {extras['ultralytics']:.3f} | {extras['yoloslim']:.3f} | "
        f"{per_epoch:+.2%} of an epoch of {result['steps_per_epoch']} steps |",
        "",
    ]
    write_text_atomic(out.with_suffix(".md"), "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
