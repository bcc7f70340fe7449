"""`yoloslim slim`: the whole pipeline in one command, each stage's output kept, resumable stage by stage.

profile -> sparsity training -> pruning -> finetuning -> export -> evaluation -> benchmark -> report, in
runs/slim/<name>/. state.json records each finished stage; running the same command again skips them and resumes an
interrupted profile or training where it stopped. An input whose gamma distribution is already sparse skips sparsity
training. The profile stage runs only for a latency target (target_latency, target_fps): it measures this model on
this machine (yoloslim.profile), or copies the latency_table given, into the run's latency.json, which the prune
stage then prunes to.

method l1 skips sparsity training: the input is pruned by filter L1 norm and the finetune gets the whole budget.

A checkpoint of the original YOLOv5 repository (anchor-based head) runs every stage: its training stages use the
classic trainer, and the run's checkpoints stay in its format. qat and the latency targets are refused for it before
any work (its head has no QAT placement; its ONNX lacks the convolution names a latency table matches); slim never
distills.

With qat, the finetune's last qat_epochs are quantization-aware for qat_target (yoloslim.finetune.QatTrainer), started
from the float finetune's best.pt; the export adds that checkpoint's INT8 Q/DQ, written with its trained ranges, beside
both placements' post-training INT8 of the float finetune, so the report shows what QAT gained over PTQ.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from yoloslim.config import (
    DEFAULT_EPOCHS,
    DEFAULT_TARGET_FLOPS,
    DEMO_EPOCHS,
    SLIM_LATENCY_TABLE,
    SPARSITY_RECIPE,
    SlimConfig,
    SparsityConfig,
)
from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.files import write_text_atomic
from yoloslim.utils.metadata import checkpoint_metadata

PLACEMENTS = {"tensorrt": "TensorRT", "cpu": "CPU"}  # the INT8 flavours as the variants' names say them
STAGES = ("profile", "sparse", "prune", "finetune", "export", "evaluate", "bench", "report")
# stop_at_flops lies below 1: a latency target whose prune removes nothing stops once anything is free
MAX_STOP_FLOPS = 0.99


def looks_sparsity_trained(ckpt: dict, model) -> bool:
    """True when sparsity training was the checkpoint's last stage, or when a fifth of the prunable gammas are below
    0.05. A prune or a finetune after it carries its record along, but its gammas are no longer the penalty's."""
    from yoloslim.sparsity import gamma_magnitudes

    stages = [k for k in checkpoint_metadata(ckpt) if k in ("sparsity", "prune", "finetune")]  # in order (with_stage)
    if stages and stages[-1] == "sparsity":
        return True
    return bool((gamma_magnitudes(model) < 0.05).mean() >= 0.2)


class Pipeline:
    """One slim run: its folder, its state, and the stages in order."""

    def __init__(self, config: SlimConfig, log: Callable[[str], None] = print):
        from yoloslim.data import check_classes, resolve_data
        from yoloslim.graph import check_unfused
        from yoloslim.models import DetectionModel as ClassicDetectionModel
        from yoloslim.utils.assets import BASELINE, SPARSE_BASELINE, shipped_file
        from yoloslim.utils.checks import load_detection_checkpoint, trained_imgsz

        self.config, self.log = config, log
        self.embedded = config.weights is None
        # the demo starts from its shipped sparse model, except by L1 norm, which needs no sparsity training
        demo_input = BASELINE if config.method == "l1" else SPARSE_BASELINE
        self.input = Path(config.weights) if config.weights else shipped_file("weights", demo_input)
        self.base = shipped_file("weights", BASELINE) if self.embedded else self.input
        self.data = resolve_data(config.data)
        model, ckpt = load_detection_checkpoint(self.input, classic=True)  # a bad checkpoint is refused before any work
        check_classes(model, self.input, self.data)
        if config.method == "bn":
            check_unfused(
                model, "it has no gammas to train sparse or rank channels by", ", or slim it with --method l1"
            )
        self.imgsz = config.imgsz or trained_imgsz(ckpt) or 640
        config.prune_config(self.imgsz, config.latency_table or SLIM_LATENCY_TABLE, config.method)  # imgsz checked
        classic = isinstance(model, ClassicDetectionModel)
        if classic:
            self._check_classic()
        if config.latency_table:  # a table of another model, size or an unreachable target: refused before any work
            self.latency_prune(config.latency_table, model)
        self.budget = config.epochs or (DEMO_EPOCHS if self.embedded else DEFAULT_EPOCHS)
        self.trains_sparsity = config.method == "bn" and not looks_sparsity_trained(ckpt, model)
        if self.trains_sparsity and self.budget < 2:
            raise YoloslimError(
                f"a budget of {self.budget} epoch leaves none to finetune after sparsity training; give 2 or more"
            )
        if config.qat:
            self._check_qat()
        self.run = (Path(config.project) / config.name).resolve()  # Ultralytics nests a relative project in runs/detect
        self.state_file = self.run / "state.json"
        self.state = self._resumed_state()
        try:
            self.run.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise YoloslimError(f"cannot create {self.run} ({e.strerror}); choose a writable --project") from None

    def _resumed_state(self) -> dict:
        """The run's state: fresh, or the unfinished run of this name when it has the same settings and reads the
        same files by content (a model retrained in place must not join the stages of the one before)."""
        from yoloslim.utils.files import file_digest

        config = asdict(self.config)
        inputs = {"weights": file_digest(self.input), "data": file_digest(self.data)}
        if not self.state_file.exists():
            return {"config": config, "inputs": inputs, "stages": {}}
        state = json.loads(self.state_file.read_text())
        changed = [f"{k} {v} -> {config.get(k)}" for k, v in state["config"].items() if config.get(k) != v]
        changed += [f"the {k} file's content" for k, v in state.setdefault("inputs", inputs).items() if inputs[k] != v]
        if changed:
            raise YoloslimError(
                f"{self.run} holds a slim run with other settings ({', '.join(changed)}); repeat its settings with "
                "the same files to resume it, or give another name for a new run"
            )
        return state

    def _check_classic(self) -> None:
        """Refuses what an anchor-based model of the original YOLOv5 repository does not take."""
        head = f"{self.input.name} has the original YOLOv5 repository's anchor-based head"
        if self.config.qat:
            raise YoloslimError(
                f"{head}, for which quantization-aware finetuning does not place Q/DQ; drop qat (the INT8 export "
                "then quantizes after finetuning)"
            )
        if self.config.latency_target or self.config.latency_table:
            raise YoloslimError(
                f"{head}, whose ONNX export does not keep the convolution names that a latency table matches; prune "
                "to target_flops or ratio instead"
            )

    def _check_qat(self) -> None:
        """Refuses a budget that may leave the finetune no float epoch before its quantization-aware ones."""
        sparse = self.sparse_epochs() if self.trains_sparsity else 0
        if self.budget - sparse <= self.config.qat_epochs:
            raise YoloslimError(
                f"qat needs a float finetune epoch before its {self.config.qat_epochs} quantization-aware one(s): a "
                f"budget of {self.budget} epochs leaves {self.budget - sparse} after up to {sparse} of sparsity "
                "training; raise epochs or lower qat_epochs"
            )

    def sparse_epochs(self) -> int:
        """The most epochs sparsity training may take: sparse_share of the budget, at most the recipe's."""
        return min(SPARSITY_RECIPE.epochs, max(1, int(self.budget * self.config.sparse_share)))

    def done(self, stage: str) -> Optional[dict]:
        return self.state["stages"].get(stage)

    def finish(self, stage: str, result: dict) -> dict:
        self.state["stages"][stage] = result
        write_text_atomic(self.state_file, json.dumps(self.state, indent=2))
        return result

    def run_all(self) -> Path:
        for stage in STAGES:
            if self.done(stage):
                self.log(f"slim: {stage} already done, skipping")
                continue
            self.log(f"slim: {stage}...")
            self.finish(stage, getattr(self, f"stage_{stage}")())
        return self.run / "report" / "report.html"

    def _train_args(self, name: str, epochs: int) -> dict:
        return dict(project=str(self.run), name=name, exist_ok=True, epochs=epochs, imgsz=self.imgsz, workers=0)

    def latency_prune(self, table: str, model=None):
        """The prune of the input to the run's amount with `table`: refuses a table of another model or image size,
        and a target the table says cannot be reached."""
        from yoloslim.profile import LatencyTable
        from yoloslim.prune import prune_model
        from yoloslim.utils.checks import load_detection_checkpoint

        profiled = LatencyTable.load(table).data["settings"]["imgsz"]
        if profiled != self.imgsz:
            raise YoloslimError(
                f"latency table {table} was profiled at imgsz {profiled}, this run is at {self.imgsz}; profile at "
                "the run's size or set imgsz to the table's"
            )
        model = model if model is not None else load_detection_checkpoint(self.input, classic=True)[0]
        return prune_model(model, self.config.prune_config(self.imgsz, table, self.config.method))

    def stage_profile(self) -> dict:
        """The latency table for a latency target: the given one copied into the run, or this model profiled on this
        machine (ONNX Runtime FP32 at the run's threads); an interrupted profile continues where it stopped."""
        from yoloslim.profile import ProfileConfig, profile

        table = self.run / SLIM_LATENCY_TABLE
        if self.config.latency_table:
            write_text_atomic(table, Path(self.config.latency_table).read_text())
            self._warn_if_unreliable(table)
            return {"table": str(table), "profiled": False}
        if not self.config.latency_target:
            return {"table": None}
        profile(self.input, ProfileConfig(threads=self.config.threads, imgsz=self.imgsz), out=table, log=self.log)
        self._warn_if_unreliable(table)
        try:
            self.latency_prune(str(table))
        except YoloslimError as e:  # the measured table says the target is out of reach: keep it for the next run
            raise YoloslimError(f"{e}; this machine's table is kept in {table} for a run under another name") from None
        return {"table": str(table), "profiled": True}

    def _warn_if_unreliable(self, table: Path) -> None:
        from yoloslim.profile import UNRELIABLE_TABLE, LatencyTable

        loaded = LatencyTable.load(table)
        if not loaded.reliable:
            self.log(f"slim: {UNRELIABLE_TABLE.format(error=100 * loaded.check_error)}")

    def prune_rounding(self) -> int:
        """The multiple the prune will round kept widths to (given, the table's best, or the default), which
        sparsity training's stop and targeted plan must assume too."""
        from yoloslim.prune.latency import resolve_rounding

        table = self.done("profile")["table"]
        return resolve_rounding(self.config.prune_config(self.imgsz, table, self.config.method)).round_to

    def sparsity_stop(self) -> float:
        """stop_at_flops for sparsity training. Its stop check counts GFLOPs; for a latency target or a ratio it is the
        fraction of GFLOPs that the run's prune keeps when planned on the input model."""
        if not self.config.latency_target and self.config.ratio is None:
            return self.config.target_flops or DEFAULT_TARGET_FLOPS
        result = self.planned_prune()
        return min(result.after["gflops"] / result.before["gflops"], MAX_STOP_FLOPS)

    def planned_prune(self):
        """The run's prune (a latency target's or a ratio's) planned on the input, for the GFLOPs it keeps."""
        from yoloslim.prune import prune_model
        from yoloslim.utils.checks import load_detection_checkpoint

        if self.config.latency_target:
            return self.latency_prune(self.done("profile")["table"])
        model = load_detection_checkpoint(self.input, classic=True)[0]
        return prune_model(model, self.config.prune_config(self.imgsz, None, self.config.method))

    def sparsity_config(self) -> SparsityConfig:
        """The sparsity stage's settings: the stop at the prune's GFLOPs, its rounding, and sr where given."""
        return SparsityConfig(stop_at_flops=self.sparsity_stop(), round_to=self.prune_rounding(), sr=self.config.sr)

    def stage_sparse(self) -> dict:
        """Sparsity training with the recipe's defaults, ending once the prune to the target is free; it may use up
        to sparse_share of the budget, the finetune gets the rest."""
        from yoloslim.sparsity import train_sparse
        from yoloslim.utils.checks import load_detection_checkpoint
        from yoloslim.utils.training import resume_point

        if self.config.method == "l1":
            self.log("slim: method l1 prunes the input as it is; skipping sparsity training")
            return {"weights": str(self.input), "skipped": True, "epochs": 0}
        model, ckpt = load_detection_checkpoint(self.input, classic=True)
        if looks_sparsity_trained(ckpt, model):
            self.log("slim: the input is already sparsity-trained; skipping sparsity training")
            return {"weights": str(self.input), "skipped": True, "epochs": 0}
        run = self.run / "sparse"
        start = resume_point(run / "weights" / "last.pt", self.input)
        if start:
            epochs = self.sparse_epochs()
            config = self.sparsity_config()
            train_sparse(
                str(start[0]), config, data=str(self.data), resume=start[1], **self._train_args("sparse", epochs)
            )
        return {"weights": str(run / "weights" / "best.pt"), "skipped": False, "epochs": epochs_trained(run)}

    def stage_prune(self) -> dict:
        from yoloslim.prune import prune

        out = self.run / "pruned.pt"
        out.unlink(missing_ok=True)  # a pruning interrupted before its rename left nothing; redo it whole
        config = self.config.prune_config(self.imgsz, self.done("profile")["table"], self.config.method)
        result = prune(self.done("sparse")["weights"], config, out=out)
        return {
            "weights": str(out),
            "widths": result.widths,
            "before": result.before,
            "after": result.after,
            "latency": result.latency,
        }

    def stage_finetune(self) -> dict:
        """The rest of the budget: float finetuning, its last qat_epochs quantization-aware with qat."""
        epochs = max(1, self.budget - self.done("sparse")["epochs"])
        if not self.config.qat:
            return {"weights": self._finetune("finetune", self.done("prune")["weights"], epochs), "epochs": epochs}
        qat_epochs = self.config.qat_epochs  # the budget left a float epoch before them (_check_qat)
        finetuned = self._finetune("finetune", self.done("prune")["weights"], epochs - qat_epochs)
        trained = self._finetune("qat", finetuned, qat_epochs, self.config.qat_config())
        qat = {"weights": trained, "epochs": qat_epochs, "target": self.config.qat_target}
        return {"weights": finetuned, "epochs": epochs - qat_epochs, "qat": qat}

    def _finetune(self, name: str, weights: str, epochs: int, qat=None) -> str:
        """One finetuning run of the stage into the run's `name` folder, resumed where it stopped; its best.pt."""
        from yoloslim.finetune import finetune
        from yoloslim.utils.training import resume_point

        last = self.run / name / "weights" / "last.pt"
        start = resume_point(last, weights)
        if start:  # a resumed run keeps its own quantization-aware settings
            fresh = None if start[1] else qat
            finetune(start[0], data=self.data, resume=start[1], qat=fresh, **self._train_args(name, epochs))
        return str(last.with_name("best.pt"))

    def stage_export(self) -> dict:
        from yoloslim.export import ExportConfig, export
        from yoloslim.export.fp16 import convert_fp16
        from yoloslim.export.onnx import export_onnx
        from yoloslim.export.qdq import quantize_int8

        folder = self.run / "export"
        onnx = {}
        for name, weights in (("base", self.base), ("finetuned", Path(self.done("finetune")["weights"]))):
            self.log(f"slim: exporting {folder / name}.onnx")
            onnx[name] = str(export_onnx(weights, imgsz=self.imgsz, out=folder / f"{name}.onnx"))
        # what TensorRT 11 needs for FP16 (strong typing); its accuracy is checked here, before any device sees it
        onnx["finetuned-fp16"] = str(convert_fp16(onnx["finetuned"], out=folder / "finetuned-fp16.onnx"))
        if self.config.precision == "int8":  # placed for TensorRT (the device) and for ONNX Runtime on this CPU
            for target, name in (("tensorrt", "finetuned-int8"), ("cpu", "finetuned-int8-cpu")):
                self.log(f"slim: INT8 for {PLACEMENTS[target]}, calibrating on the training images: {name}.onnx")
                onnx[name] = str(
                    quantize_int8(onnx["finetuned"], self.data, out=folder / f"{name}.onnx", target=target)
                )
        qat = self.done("finetune").get("qat")
        if qat:  # the trained ranges: no calibration
            config = ExportConfig(precision="int8", imgsz=self.imgsz, target=qat["target"])
            onnx["qat-int8"] = str(export(qat["weights"], config, out=folder / f"qat-int8-{qat['target']}.onnx"))
        return {"onnx": onnx}

    def variants(self) -> list[dict]:
        """Every variant the run compares; the TensorRT ones are listed always, measured only where TensorRT is."""
        import importlib.util

        stages = self.state["stages"]
        onnx = stages["export"]["onnx"]
        found = [_variant("base", "base", "PyTorch", "fp32", str(self.base))]
        if stages["sparse"]["weights"] != str(self.base):
            found.append(_variant("sparse", "sparse", "PyTorch", "fp32", stages["sparse"]["weights"]))
        found += [
            _variant("pruned", "pruned", "PyTorch", "fp32", stages["prune"]["weights"]),
            _variant("finetuned", "finetuned", "PyTorch", "fp32", stages["finetune"]["weights"]),
            _variant("base ONNX", "base", "ONNX Runtime", "fp32", onnx["base"]),
            _variant("finetuned ONNX", "finetuned", "ONNX Runtime", "fp32", onnx["finetuned"]),
            _variant("finetuned FP16 ONNX", "finetuned", "ONNX Runtime", "fp16", onnx["finetuned-fp16"]),
        ]
        if "finetuned-int8" in onnx:
            found += [
                _variant(
                    "finetuned INT8 Q/DQ, TensorRT placement",
                    "finetuned",
                    "ONNX Runtime",
                    "int8",
                    onnx["finetuned-int8"],
                ),
                _variant(
                    "finetuned INT8 Q/DQ, CPU placement",
                    "finetuned",
                    "ONNX Runtime",
                    "int8",
                    onnx["finetuned-int8-cpu"],
                ),
            ]
        qat = stages["finetune"].get("qat")
        if qat:
            name = f"QAT INT8 Q/DQ, {PLACEMENTS[qat['target']]} placement"
            found.append(_variant(name, "qat", "ONNX Runtime", "int8", onnx["qat-int8"]))
        has_trt = importlib.util.find_spec("tensorrt") is not None
        note = (
            "not measured: build the engine with yoloslim export --format engine, then yoloslim eval and bench"
            if has_trt
            else "not measured: no TensorRT on this machine"
        )
        for precision in ("fp16", self.config.precision) if self.config.precision == "int8" else ("fp16",):
            name, backend = f"finetuned TensorRT {precision.upper()}", f"TensorRT {precision.upper()}"
            found.append({**_variant(name, "finetuned", backend, precision, None), "note": note})
        return found

    def stage_evaluate(self) -> dict:
        """Each measured variant's mAP with its interval, and its change against the base it is compared with (the
        report's reference) with a paired interval: the same images resampled for both."""
        from yoloslim.evaluate import model_records, paired_bootstrap_delta, summarise
        from yoloslim.report import reference

        variants = [v for v in self.variants() if v["weights"]]
        records, results = {}, {}
        for v in variants:
            self.log(f"slim: evaluating {v['name']}")
            records[v["name"]], names = model_records(v["weights"], self.data, self.imgsz, threads=self.config.threads)
            results[v["name"]] = summarise(records[v["name"]], names).as_dict()
        self.log("slim: paired bootstrap intervals against each variant's base")
        for v in variants:
            ref = reference(variants, v)
            if ref is not None and ref is not v:
                delta = paired_bootstrap_delta(records[ref["name"]], records[v["name"]], num_classes=max(len(names), 1))
                results[v["name"]]["paired"] = {"against": ref["name"], **delta}
        return {"results": results}

    def stage_bench(self) -> dict:
        """Every measured variant timed at 1 thread, alone and end to end, then alone at the run's threads in a pass of
        its own (see bench_thread_counts)."""
        from yoloslim.bench import bench, bench_thread_counts

        measured = [v for v in self.variants() if v["weights"]]
        weights = [v["weights"] for v in measured]
        first, *more = bench_thread_counts(self.config.threads)
        threads = " and ".join(str(n) for n in (first, *more))
        self.log(f"slim: timing {len(weights)} variants interleaved at {threads} thread(s)")
        report = bench(weights, imgsz=self.imgsz, threads=first, more_threads=tuple(more), data=self.data)
        by_weights = {r["weights"]: r for r in report["results"]}
        return {
            "results": {v["name"]: by_weights[str(Path(v["weights"]))] for v in measured},
            "environment": report["environment"],
        }

    def stage_report(self) -> dict:
        from yoloslim.report import SUMMARY, write_report
        from yoloslim.utils.training import read_checkpoint_extras

        stages = self.state["stages"]
        variants = []
        for v in self.variants():
            variants.append(
                {
                    **v,
                    "eval": stages["evaluate"]["results"].get(v["name"]),
                    "bench": stages["bench"]["results"].get(v["name"]),
                }
            )
        summary = {
            "name": f"{self.config.name}: {self.input.name} on {Path(self.data).parent.name}",
            "data": str(self.data),
            "imgsz": self.imgsz,
            "environment": stages["bench"]["environment"],
            "variants": variants,
            "prune": {"widths": stages["prune"]["widths"], "latency": stages["prune"].get("latency")},
            "gamma_history": read_checkpoint_extras(stages["sparse"]["weights"]).get("gamma_history"),
        }
        write_text_atomic(self.run / SUMMARY, json.dumps(summary, indent=2, default=_plain))
        paths = write_report([self.run], self.run / "report")
        return {k: str(p) for k, p in paths.items()}


def _variant(name: str, stage: str, backend: str, precision: str, weights: Optional[str]) -> dict:
    return {"name": name, "stage": stage, "backend": backend, "precision": precision, "weights": weights}


def epochs_trained(run: Path) -> int:
    """Epochs a finished Ultralytics run trained: the rows of its results.csv (an early stop ends it sooner)."""
    results = run / "results.csv"
    return max(0, len(results.read_text().strip().splitlines()) - 1) if results.exists() else 0


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def slim(config: SlimConfig | None = None) -> Path:
    """Run (or resume) the pipeline; return the HTML report's path."""
    return Pipeline(config or SlimConfig()).run_all()
