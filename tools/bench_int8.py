"""INT8 benchmark: accuracy of the Q/DQ model against FP32, and what pre- plus postprocessing cost per frame.

    python tools/bench_int8.py                          # the shipped baseline on the embedded synthetic dataset
    python tools/bench_int8.py --weights <license-plate>/license_plate_yolov5nu.pt --data <license-plate>/data.yaml

1. mAP50-95 of the FP32 ONNX and of the Q/DQ INT8 ONNX on the validation split, both run by ONNX Runtime with the
   runtime's own letterbox and NMS, and their difference with a paired 95% bootstrap interval over images
   (INT8 should lose at most 1.0 point).
2. Per frame with the ONNX Runtime backend (FP32): letterbox + NMS time as a fraction of inference time, timed
   interleaved over the validation images, threads pinned and recorded.
Writes runs/bench/int8.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="the FP32 detection checkpoint (default: the shipped baseline)")
    parser.add_argument(
        "--data", help="its dataset yaml: calibration on train, evaluation on val (default: the embedded dataset)"
    )
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "int8"))
    args = parser.parse_args()

    import cv2
    import numpy as np

    from yoloslim.data import resolve_data
    from yoloslim.evaluate import paired_bootstrap_delta, predict_records, split_images
    from yoloslim.export.onnx import export_onnx
    from yoloslim.export.qdq import quantize_int8
    from yoloslim.runtime.backends import OnnxRuntimeBackend
    from yoloslim.runtime.postprocess import postprocess
    from yoloslim.runtime.preprocess import preprocess
    from yoloslim.utils.assets import BASELINE, shipped_file
    from yoloslim.utils.files import write_text_atomic

    weights = args.weights or shipped_file("weights", BASELINE)
    data = resolve_data(args.data)
    out = Path(args.out)
    work = out.parent / "int8-models"
    work.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(weights, imgsz=args.imgsz, out=work / "fp32.onnx")
    int8 = quantize_int8(fp32, data, out=work / "int8.onnx")
    images, names = split_images(data, "val")
    backends = {p.stem: OnnxRuntimeBackend(str(p), threads=args.threads) for p in (fp32, int8)}
    records = {name: predict_records(b, images, args.imgsz) for name, b in backends.items()}
    delta = paired_bootstrap_delta(records["fp32"], records["int8"], num_classes=len(names))

    frames = [cv2.imread(str(p)) for p in images]
    stages = {"preprocess": [], "inference": [], "postprocess": []}
    for frame in frames:  # the three stages alternate frame by frame, so drift hits them alike
        t0 = time.perf_counter()
        batch, boxes = preprocess([frame], args.imgsz)
        t1 = time.perf_counter()
        output = backends["fp32"](batch)
        t2 = time.perf_counter()
        postprocess(output, boxes)
        t3 = time.perf_counter()
        for key, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2)):
            stages[key].append(seconds)
    ms = {k: float(np.median(v) * 1e3) for k, v in stages.items()}
    result = {
        "map50-95": {"fp32": _map(records["fp32"], names), "int8": _map(records["int8"], names)},
        "delta_map50-95": {"change": delta["map"][0], "ci95": [delta["map"][1], delta["map"][2]]},
        "delta_map50": {"change": delta["map50"][0], "ci95": [delta["map50"][1], delta["map50"][2]]},
        "per_frame_ms_median": ms,
        "pre_plus_post_over_inference": (ms["preprocess"] + ms["postprocess"]) / ms["inference"],
        "images": len(images),
        "threads": args.threads,
        "command": "python " + " ".join(sys.argv),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".json"), json.dumps(result, indent=2))
    md = "\n".join(
        [
            "# INT8 (Q/DQ) against FP32, ONNX Runtime CPU",
            "",
            f"`{result['command']}` ({args.threads} threads, {len(images)} images)",
            "",
            "| | FP32 | INT8 | INT8 - FP32 (paired 95% CI) |",
            "| --- | ---: | ---: | --- |",
            f"| mAP50-95 | {result['map50-95']['fp32']:.4f} | {result['map50-95']['int8']:.4f} "
            f"| {delta['map'][0] * 100:+.2f} pt ({delta['map'][1] * 100:+.2f} to {delta['map'][2] * 100:+.2f}) |",
            "",
            "| per frame, median ms | letterbox | inference (FP32) | NMS | (letterbox + NMS) / inference |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| ONNX Runtime | {ms['preprocess']:.2f} | {ms['inference']:.2f} | {ms['postprocess']:.2f} "
            f"| {result['pre_plus_post_over_inference']:.1%} |",
            "",
        ]
    )
    write_text_atomic(out.with_suffix(".md"), md)
    print(md)


def _map(records, names) -> float:
    from yoloslim.evaluate import mean_ap

    return mean_ap(records, len(names))[1]


if __name__ == "__main__":
    from yoloslim.utils.errors import YoloslimError

    try:
        main()
    except YoloslimError as e:
        sys.exit(f"bench_int8: error: {e}")
