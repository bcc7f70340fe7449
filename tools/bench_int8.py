"""INT8 benchmark: both Q/DQ flavours against FP32 in ONNX Runtime on the CPU, accuracy and latency, in one run.

    python tools/bench_int8.py                          # the shipped baseline on the embedded synthetic dataset
    python tools/bench_int8.py --weights pruned.pt --out docs/results/int8-pruned
    python tools/bench_int8.py --weights <license-plate>/license_plate_yolov5nu.pt --data <license-plate>/data.yaml
    python tools/bench_int8.py --weights fp32/weights/best.pt --qat qat-tensorrt/weights/best.pt qat-cpu/weights/best.pt

`--qat`: quantization-aware checkpoints finetuned from the same model, each exported with its trained ranges (no
calibration) and evaluated beside PTQ against the FP32 model; give as FP32 model the one finetuned as many epochs in
float (N FP32 epochs against N - k FP32 + k QAT). Their Q/DQ graph is their flavour's PTQ graph with other scales and
weights, so their latency is that flavour's and is not timed again.

1. mAP50-95 of the FP32 ONNX and of the INT8 ONNX in each flavour (`--target tensorrt` and `--target cpu`, calibrated
   on the same training images) on the validation split, all run by ONNX Runtime with the runtime's own letterbox and
   NMS, and each flavour's difference from FP32 with a paired 95% bootstrap interval over images.
2. Latency of the three models at 1 and 2 threads (`--threads`), timed interleaved in one run: every round times each
   (model, threads) pair a few times in a rotating order, so load from other processes hits them alike. Reported: the
   median and the 10th to 90th percentile of single calls, and each INT8 flavour's median as a fraction of FP32's at
   the same threads with a 95% bootstrap interval over rounds.
3. What ONNX Runtime's graph optimizer makes of each file: quantized kernels (QLinearConv...) and float convolutions.
4. Per frame with the FP32 model: letterbox + NMS time as a fraction of inference time, timed interleaved over the
   validation images.
Writes OUT.json and OUT.md (default runs/bench/int8), the ONNX files in OUT-models beside them (in runs/bench/ for
an OUT in docs/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("fp32", "tensorrt", "cpu")  # the FP32 ONNX and the two INT8 flavours
QUANTIZED_KERNELS = ("QLinearConv", "QLinearSigmoid", "QLinearMul", "QLinearAdd", "QLinearConcat")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="the FP32 detection checkpoint (default: the shipped baseline)")
    parser.add_argument(
        "--data", help="its dataset yaml: calibration on train, evaluation on val (default: the embedded dataset)"
    )
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--calibration-images", type=int, default=500)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts timed (default 1 2)")
    parser.add_argument("--rounds", type=int, default=60, help="timing rounds (default 60)")
    parser.add_argument("--per-round", type=int, default=5, help="calls per model and thread count in each round")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "int8"), help="OUT.json and OUT.md")
    parser.add_argument("--qat", nargs="+", default=[], help="quantization-aware checkpoints of the same model")
    args = parser.parse_args()

    from yoloslim.data import resolve_data
    from yoloslim.export import ExportConfig, export
    from yoloslim.export.onnx import export_onnx
    from yoloslim.export.qdq import quantize_int8
    from yoloslim.utils.assets import BASELINE, shipped_file
    from yoloslim.utils.errors import YoloslimError
    from yoloslim.utils.files import write_text_atomic

    weights = Path(args.weights or shipped_file("weights", BASELINE))
    data = resolve_data(args.data)
    out = Path(args.out)
    # The ONNX files go beside the results, except out of docs/ (where committed results go): to runs/bench/
    beside = ROOT / "runs" / "bench" if out.resolve().is_relative_to(ROOT / "docs") else out.parent
    work = beside / f"{out.name}-models"
    work.mkdir(parents=True, exist_ok=True)
    paths = {"fp32": export_onnx(weights, imgsz=args.imgsz, out=work / "fp32.onnx")}
    for target in MODELS[1:]:
        paths[target] = quantize_int8(
            paths["fp32"], data, out=work / f"int8-{target}.onnx", count=args.calibration_images, target=target
        )
    qat_runs = {}
    for qat in args.qat:
        target = qat_target(qat)
        if target in qat_runs:
            raise YoloslimError(f"{qat_runs[target]} and {qat} are both {target} QAT checkpoints; give one of each")
        qat_runs[target] = qat
        config = ExportConfig(precision="int8", imgsz=args.imgsz, target=target)
        paths[f"qat-{target}"] = export(qat, config, out=work / f"qat-int8-{target}.onnx")
    load_before = os.getloadavg()
    result = {
        "weights": str(weights),
        "imgsz": args.imgsz,
        "calibration_images": args.calibration_images,
        "qat": qat_runs,
        "accuracy": accuracy(paths, data),
        "latency": latency(paths, data, args.threads, args.rounds, args.per_round),
        "graphs": {name: graph_summary(path, work) for name, path in paths.items()},
        "per_frame": per_frame_costs(paths["fp32"], data, max(args.threads)),
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "command": "python " + " ".join(sys.argv),
    }
    from yoloslim.runtime.doctor import environment

    result["environment"] = environment(max(args.threads))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".json"), json.dumps(result, indent=2))
    md = markdown(result)
    write_text_atomic(out.with_suffix(".md"), md)
    print(md)


def qat_target(weights: str) -> str:
    """The INT8 flavour a quantization-aware checkpoint was finetuned for; refuses any other checkpoint."""
    from yoloslim.utils.checks import load_detection_checkpoint
    from yoloslim.utils.errors import YoloslimError
    from yoloslim.utils.metadata import checkpoint_metadata

    record = checkpoint_metadata(load_detection_checkpoint(weights)[1]).get("qat")
    if not record:
        raise YoloslimError(f"{weights} was not finetuned quantization-aware; give --qat a finetune --qat checkpoint")
    return record["target"]


def accuracy(paths: dict, data) -> dict:
    """mAP50-95 and mAP50 of each model, and each INT8 flavour's paired change against FP32."""
    from yoloslim.evaluate import mean_ap, paired_bootstrap_delta, predict_records, split_images
    from yoloslim.runtime.backends import OnnxRuntimeBackend

    images, names = split_images(data, "val")
    backends = {name: OnnxRuntimeBackend(str(p)) for name, p in paths.items()}
    records = {name: predict_records(b, images, b.input_size(), progress=False) for name, b in backends.items()}
    found = {"images": len(images), "map50-95": {}, "map50": {}, "change_against_fp32": {}}
    for name, recs in records.items():
        found["map50"][name], found["map50-95"][name] = mean_ap(recs, len(names))
        if name != "fp32":
            delta = paired_bootstrap_delta(records["fp32"], recs, num_classes=len(names))
            found["change_against_fp32"][name] = {
                key: {"change": delta[key][0], "ci95": [delta[key][1], delta[key][2]]} for key in ("map", "map50")
            }
    return found


def latency(paths: dict, data, threads: list, rounds: int, per_round: int) -> dict:
    """Every (model, threads) pair timed in the same interleaved rounds on one letterboxed validation image."""
    import cv2
    import numpy as np

    from yoloslim.data import split_images
    from yoloslim.runtime.backends import OnnxRuntimeBackend
    from yoloslim.runtime.preprocess import preprocess
    from yoloslim.utils.timing import compare_latency, speedup_interval

    images, _ = split_images(data, "val")
    backends = {(m, t): OnnxRuntimeBackend(str(paths[m]), threads=t) for t in threads for m in MODELS}
    batch, _ = preprocess([cv2.imread(str(images[0]))], backends["fp32", threads[0]].input_size())
    timed = compare_latency(
        {f"{m}@{t}": (lambda b=b: b(batch)) for (m, t), b in backends.items()}, rounds=rounds, per_round=per_round
    )
    found = {"rounds": rounds, "per_round": per_round, "affinity": sorted(os.sched_getaffinity(0)), "models": {}}
    for key, lat in timed.items():
        calls = np.asarray(lat.rounds_ms).ravel()
        found["models"][key] = {"p50_ms": lat.p50_ms, "p10_ms": float(np.percentile(calls, 10)), "p90_ms": lat.p90_ms}
        model, count = key.split("@")
        if model != "fp32":
            low, high = speedup_interval(timed[f"fp32@{count}"], lat)  # FP32 / INT8: inverted below
            found["models"][key]["fraction_of_fp32"] = lat.p50_ms / timed[f"fp32@{count}"].p50_ms
            found["models"][key]["fraction_ci95"] = [1 / high, 1 / low]
    return found


def graph_summary(path: Path, work: Path) -> dict:
    """Node types of the graph ONNX Runtime's CPU provider runs (its optimized model), and the convolutions of the
    file whose weights are quantized."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(work / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    model = onnx.load(str(path))
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    return {
        "convs": len(convs),
        "convs_with_int8_weights": sum(n.input[1] in dequantized for n in convs),
        "optimized": {op: ops[op] for op in (*QUANTIZED_KERNELS, "Conv", "QuantizeLinear", "DequantizeLinear")},
    }


def per_frame_costs(fp32: Path, data, threads: int) -> dict:
    """Median letterbox, FP32 inference and NMS per validation image; the three alternate frame by frame."""
    import cv2
    import numpy as np

    from yoloslim.data import split_images
    from yoloslim.runtime.backends import OnnxRuntimeBackend
    from yoloslim.runtime.postprocess import postprocess
    from yoloslim.runtime.preprocess import preprocess

    images, _ = split_images(data, "val")
    backend = OnnxRuntimeBackend(str(fp32), threads=threads)
    stages = {"preprocess": [], "inference": [], "postprocess": []}
    for path in images:
        frame = cv2.imread(str(path))
        t0 = time.perf_counter()
        batch, boxes = preprocess([frame], backend.input_size())
        t1 = time.perf_counter()
        output = backend(batch)
        t2 = time.perf_counter()
        postprocess(output, boxes)
        t3 = time.perf_counter()
        for key, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2)):
            stages[key].append(seconds)
    ms = {k: float(np.median(v) * 1e3) for k, v in stages.items()}
    return {
        "threads": threads,
        "median_ms": ms,
        "pre_plus_post_over_inference": (ms["preprocess"] + ms["postprocess"]) / ms["inference"],
    }


def markdown(result: dict) -> str:
    acc, lat, env = result["accuracy"], result["latency"], result["environment"]
    threads = sorted({int(k.split("@")[1]) for k in lat["models"]})
    label = {
        "fp32": "FP32",
        "tensorrt": "INT8, TensorRT flavour (PTQ)",
        "cpu": "INT8, CPU flavour (PTQ)",
        "qat-tensorrt": "INT8, TensorRT flavour (QAT)",
        "qat-cpu": "INT8, CPU flavour (QAT)",
    }
    lines = [
        "# INT8 flavours against FP32, ONNX Runtime CPU",
        "",
        f"`{result['command']}`",
        "",
        f"{Path(result['weights']).name} at {result['imgsz']} px, {result['calibration_images']} calibration images "
        f"at most; {env['cpu']} ({env['cores']} cores, {env['cpu_vector_isa']}, int8 dot product: "
        f"{env.get('cpu_int8_dot_product') or 'none'}), onnxruntime {env.get('onnxruntime')}; "
        f"load average {result['load_average_before_after'][0]:.2f} before the timing, "
        f"{result['load_average_before_after'][1]:.2f} after.",
        "",
        f"| model | mAP50-95 | change against FP32 (paired 95% CI, {acc['images']} images) "
        + "".join(f"| {t} thread{'s' if t > 1 else ''}: p50 ms (p10-p90) | fraction of FP32 (95% CI) " for t in threads)
        + "|",
        "| --- | ---: | --- " + "| ---: | --- " * len(threads) + "|",
    ]
    for name in acc["map50-95"]:
        change = acc["change_against_fp32"].get(name, {}).get("map")
        cells = [label[name], f"{acc['map50-95'][name]:.4f}"]
        cells.append(
            f"{change['change'] * 100:+.2f} pt ({change['ci95'][0] * 100:+.2f} to {change['ci95'][1] * 100:+.2f})"
            if change
            else ""
        )
        for t in threads:
            if name.startswith("qat-"):  # the same graph as its flavour's PTQ
                cells += [f"as {label[name[4:]]}", ""]
                continue
            m = lat["models"][f"{name}@{t}"]
            cells.append(f"{m['p50_ms']:.2f} ({m['p10_ms']:.2f}-{m['p90_ms']:.2f})")
            ci = m.get("fraction_ci95")
            cells.append(f"{m['fraction_of_fp32']:.3f} ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Timing: {lat['rounds']} interleaved rounds, {lat['per_round']} calls per model and thread count in each, "
        f"CPU affinity {lat['affinity']}.",
        "",
        "| model | convolutions with int8 weights | ONNX Runtime's optimized graph |",
        "| --- | ---: | --- |",
    ]
    for name, g in result["graphs"].items():
        ops = ", ".join(f"{v} {k}" for k, v in g["optimized"].items() if v)
        lines.append(f"| {label[name]} | {g['convs_with_int8_weights']} of {g['convs']} | {ops} |")
    frame = result["per_frame"]
    ms = frame["median_ms"]
    lines += [
        "",
        f"Per frame with FP32 ({frame['threads']} threads, median ms): letterbox {ms['preprocess']:.2f}, inference "
        f"{ms['inference']:.2f}, NMS {ms['postprocess']:.2f}; letterbox + NMS = "
        f"{frame['pre_plus_post_over_inference']:.1%} of inference.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    from yoloslim.utils.errors import YoloslimError

    try:
        main()
    except YoloslimError as e:
        sys.exit(f"bench_int8: error: {e}")
