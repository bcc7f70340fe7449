"""Latency-aware pruning against FLOPs-targeted pruning, timed in one run: does the prune hit its latency, and how
much speed does each GFLOP removed buy?

    python tools/bench_latency.py                     # the shipped baseline, l1, 0.5 of its latency, 320 px, 1 thread
    python tools/bench_latency.py --weights best.pt --method bn --target-latency 0.5 --threads 1 2

Stages, under runs/bench/latency/<weights stem>/, each skipped when its output exists (run the same command again to
continue):

1. `table.json`: `yoloslim profile` of the unpruned model's ONNX on this CPU at the first --threads (itself resumable);
2. `latency.pt`: `yoloslim prune --target-latency T --latency-table table.json`;
3. `flops-matched.pt`: a FLOPs-targeted prune (a global threshold, as `--target-flops` cuts) whose target_flops is
   bisected until the table predicts the same latency as the latency-aware prune's: the same latency, reached the
   FLOPs way;
4. `flops-<F>.pt`: the FLOPs-targeted prune at `--target-flops` (default 0.5, yoloslim's default amount);
5. timing: every model exported to ONNX at --imgsz and timed interleaved with the unpruned one, at each --threads.

For each prune: GFLOPs, the latency the table predicts, the measured latency as a fraction of the unpruned model's
(the median of the per-round ratios, both timed back to back in each round) with its distance from the target, the
speedup with its 95% interval over rounds, and speedup ÷ GFLOPs reduction (1.0: latency falls as fast as the GFLOPs).
Writes result.json and result.md there, with the command. No training: the prunes are measured as they come out.
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", help="checkpoint to prune (default: the shipped baseline)")
    parser.add_argument("--method", default="l1", choices=["bn", "l1"])
    parser.add_argument("--target-latency", type=float, default=0.5)
    parser.add_argument("--target-flops", type=float, default=0.5, help="the plain FLOPs-targeted arm")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="the table is made at the first")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--out", default="runs/bench/latency")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    from yoloslim.utils.assets import BASELINE, shipped_file
    from yoloslim.utils.files import write_text_atomic

    args = parse_args(argv)
    weights = Path(args.weights) if args.weights else shipped_file("weights", BASELINE)
    run = Path(args.out) / weights.stem
    run.mkdir(parents=True, exist_ok=True)
    state_file = run / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}

    def save():
        write_text_atomic(state_file, json.dumps(state, indent=2))

    table = profile_stage(weights, run, args)
    arms = prune_stages(weights, run, table, args, state, save)
    for threads in args.threads:
        key = f"timing-{threads}t"
        if key not in state:
            state[key] = time_arms(weights, arms, run, args, threads)
            save()
    result = summarise(state, arms, table, args, weights)
    write_text_atomic(run / "result.json", json.dumps(result, indent=2))
    write_text_atomic(run / "result.md", markdown(result))
    print(markdown(result))
    print(f"\nwrote {run / 'result.json'} and {run / 'result.md'}")


def profile_stage(weights: Path, run: Path, args):
    from yoloslim.export.onnx import export_onnx
    from yoloslim.profile import ProfileConfig, profile, table_summary

    onnx_path = run / "base.onnx"
    if not onnx_path.exists():
        export_onnx(weights, imgsz=args.imgsz, out=onnx_path)
    table = profile(onnx_path, ProfileConfig(threads=args.threads[0]), out=run / "table.json")
    print(table_summary(table))
    return table


def prune_stages(weights: Path, run: Path, table, args, state: dict, save) -> dict:
    """name -> pruned checkpoint, each made once."""
    from yoloslim.config import PruneConfig
    from yoloslim.prune import prune

    common = dict(method=args.method, latency_table=str(run / "table.json"), imgsz=args.imgsz)
    arms = {"latency": run / "latency.pt"}
    if not arms["latency"].exists():
        prune(weights, PruneConfig(target_latency=args.target_latency, **common), out=arms["latency"])
    if "flops-matched" not in state:
        state["flops-matched"] = matched_flops_target(weights, run, common, args)
        save()
    arms["flops-matched"] = run / "flops-matched.pt"
    if not arms["flops-matched"].exists():
        prune(
            weights,
            PruneConfig(target_flops=state["flops-matched"]["target_flops"], **common),
            out=arms["flops-matched"],
        )
    arms[f"flops-{args.target_flops:g}"] = run / f"flops-{args.target_flops:g}.pt"
    if not arms[f"flops-{args.target_flops:g}"].exists():
        prune(weights, PruneConfig(target_flops=args.target_flops, **common), out=arms[f"flops-{args.target_flops:g}"])
    return arms


def matched_flops_target(weights: Path, run: Path, common: dict, args) -> dict:
    """The target_flops whose prune the table predicts at the latency-aware prune's predicted latency (bisection)."""

    from yoloslim.config import PruneConfig
    from yoloslim.prune import prune_model
    from yoloslim.utils.checks import load_detection_checkpoint
    from yoloslim.utils.errors import YoloslimError
    from yoloslim.utils.training import read_checkpoint_extras

    model = load_detection_checkpoint(weights)[0].float()
    aim = read_checkpoint_extras(run / "latency.pt")["prune"]["latency"]["predicted"]
    lo, hi, best = 0.05, 1.0, None
    for _ in range(8):
        mid = (lo + hi) / 2
        try:
            predicted = prune_model(model, PruneConfig(target_flops=mid, **common)).latency["predicted"]
        except YoloslimError:  # below what the guards and rounding can reach: aim higher
            lo = mid
            print(f"flops-matched: target_flops {mid:.4f} is out of reach")
            continue
        if predicted <= aim:
            lo, best = mid, {"target_flops": round(mid, 4), "predicted": predicted, "aim": aim}
        else:
            hi = mid
        print(f"flops-matched: target_flops {mid:.4f} -> predicted {predicted:.4f} (aim {aim:.4f})")
    return best or {"target_flops": round(lo, 4), "predicted": None, "aim": aim}


def time_arms(weights: Path, arms: dict, run: Path, args, threads: int) -> dict:
    import numpy as np

    from yoloslim.export.onnx import export_onnx
    from yoloslim.profile.timing import paired_ratio
    from yoloslim.runtime.backends import OnnxRuntimeBackend
    from yoloslim.runtime.doctor import environment
    from yoloslim.utils.timing import compare_latency, speedup_interval

    paths = {"unpruned": weights, **arms}
    backends = {}
    for name, path in paths.items():
        onnx_path = run / f"{name}.onnx"
        if not onnx_path.exists():
            export_onnx(path, imgsz=args.imgsz, out=onnx_path)
        backends[name] = OnnxRuntimeBackend(str(onnx_path), threads=threads)
    x = np.random.default_rng(0).random((1, 3, args.imgsz, args.imgsz), dtype=np.float32)
    timed = compare_latency(
        {name: (lambda b=b: b(x)) for name, b in backends.items()}, rounds=args.rounds, per_round=args.per_round
    )
    base = timed["unpruned"]
    out = {"environment": environment(threads), "unpruned_ms": base.p50_ms, "arms": {}}
    for name in arms:
        ratio = paired_ratio(timed[name], base)
        low, high = speedup_interval(base, timed[name])
        out["arms"][name] = {
            "ms": timed[name].p50_ms,
            "fraction": ratio,
            "speedup": 1 / ratio,
            "speedup_ci": [low, high],
        }
    return out


def summarise(state: dict, arms: dict, table, args, weights: Path) -> dict:
    from yoloslim.utils.training import read_checkpoint_extras

    rows = {}
    for name, path in arms.items():
        meta = read_checkpoint_extras(path)["prune"]
        reduction = meta["before"]["gflops"] / meta["after"]["gflops"]
        row = {
            "params": meta["after"]["params"],
            "channels_kept": 1 - meta["removed_fraction"],
            "gflops": meta["after"]["gflops"],
            "gflops_reduction": reduction,
            "predicted": meta["latency"]["predicted"],
            "settings": {k: meta["settings"][k] for k in ("method", "target_latency", "target_flops", "round_to")},
            "timing": {},
        }
        for threads in args.threads:
            t = state[f"timing-{threads}t"]["arms"][name]
            row["timing"][threads] = {**t, "speedup_per_gflops_reduction": t["speedup"] / reduction}
        rows[name] = row
    first = state[f"timing-{args.threads[0]}t"]
    return {
        "command": "python " + " ".join(sys.argv),
        "weights": str(weights),
        "imgsz": args.imgsz,
        "target_latency": args.target_latency,
        "unpruned_gflops": read_checkpoint_extras(arms["latency"])["prune"]["before"]["gflops"],
        "table": {
            "describe": table.describe(),
            "round_to": table.round_to,
            "check_max_error": table.data["check"]["max_error"],
            "check_mean_error": table.data["check"]["mean_error"],
            "measurements": len(table.data["measurements"]),
        },
        "unpruned_ms": {t: state[f"timing-{t}t"]["unpruned_ms"] for t in args.threads},
        "environment": first["environment"],
        "flops_matched": state["flops-matched"],
        "arms": rows,
    }


def markdown(result: dict) -> str:
    threads = list(next(iter(result["arms"].values()))["timing"])
    head = "| prune | settings | channels kept | params | GFLOPs (÷) | predicted | " + " | ".join(
        f"measured, {t}T (speedup, 95% CI) | speedup ÷ GFLOPs reduction, {t}T" for t in threads
    )
    lines = [head + " |", "| --- | --- | ---: | ---: | ---: | ---: |" + " ---: | ---: |" * len(threads)]
    for name, row in result["arms"].items():
        s = row["settings"]
        settings = ", ".join(f"{k} {v}" for k, v in s.items() if v is not None)
        cells = []
        for t in threads:
            m = row["timing"][t]
            low, high = m["speedup_ci"]
            cells.append(
                f"{m['fraction']:.3f} ({m['ms']:.2f} ms; {m['speedup']:.2f}x, {low:.2f}-{high:.2f}) | "
                f"{m['speedup_per_gflops_reduction']:.2f}"
            )
        lines.append(
            f"| {name} | {settings} | {row['channels_kept']:.3f} | {row['params']:,} | {row['gflops']:.3f} "
            f"(÷{row['gflops_reduction']:.2f}) | {row['predicted']:.3f} | " + " | ".join(cells) + " |"
        )
    tab, env = result["table"], result["environment"]
    latency = result["arms"]["latency"]["timing"][threads[0]]["fraction"]
    miss = (latency - result["target_latency"]) / result["target_latency"]
    return "\n".join(
        [
            f"# Latency-aware against FLOPs-targeted pruning: {Path(result['weights']).name}, {result['imgsz']} px",
            "",
            f"`{result['command']}`",
            "",
            f"Target: {result['target_latency']} of the unpruned latency at {threads[0]} thread(s); the latency-aware "
            f"prune measured {latency:.3f} ({100 * miss:+.1f} % from the target). Unpruned: "
            + ", ".join(f"{ms:.2f} ms at {t}T" for t, ms in result["unpruned_ms"].items())
            + f", {result['unpruned_gflops']:.3f} GFLOPs.",
            "",
            *lines,
            "",
            f"Latency table: {tab['describe']}, {tab['measurements']} measurements, best rounding multiple "
            f"{tab['round_to']}; predictor check over unseen plans: largest error "
            f"{100 * tab['check_max_error']:.1f} %, "
            f"mean {100 * tab['check_mean_error']:.1f} %. flops-matched: target_flops "
            f"{result['flops_matched']['target_flops']} bisected to the latency-aware prune's predicted latency.",
            "",
            f"{env['cpu']} ({env.get('cpu_vector_isa')}), {env['cores']} cores, onnxruntime {env.get('onnxruntime')}; "
            "every model timed interleaved with the unpruned one in the same run.",
        ]
    )


if __name__ == "__main__":
    main()
