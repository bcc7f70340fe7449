"""`yoloslim profile`: how a detector's latency on this device depends on each prunable group's width.

Torch-free: it reads the channel groups from the ONNX (groups.py), times narrowed copies on the backend the model will
run on (timing.py; ONNX Runtime, or TensorRT engines built by yoloslim's engine builder) and fits the predictor
(predictor.py). A .pt is exported to ONNX first, which needs torch; on a device, bring the ONNX.

What it times, each interleaved with the unpruned model:

1. the same prune (every group at 0.4 of its width) rounded to each candidate multiple: the rounding this backend
   runs best, the table's `round_to`;
2. each group alone at a few widths the rounding allows;
3. random whole-model plans for the fit, and others the fit never sees, to check it: the largest relative error over
   them is the table's `check.max_error`.

The table is written atomically after every measurement; running the same command again continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from yoloslim.config import option
from yoloslim.profile.groups import read_groups, slice_model
from yoloslim.profile.plans import best_multiple, changed, random_plans, sweep_widths, uniform_plan
from yoloslim.profile.predictor import Features, Predictor, relative_errors
from yoloslim.profile.timing import BACKENDS
from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.files import output_path, write_text_atomic

TABLE_FORMAT = 1
# What a finished table holds that pruning reads (a table edited by hand may lack some)
FINISHED_TABLE_KEYS = frozenset(
    {"settings", "environment", "measurements", "round_to", "reference_ms", "features", "predictor", "check", "groups"}
)
PRECISIONS = ("fp32", "fp16", "int8")
PROBE_FRACTION = 0.4  # the rounding probes' prune: far enough from the full widths that misalignment shows


@dataclass(frozen=True)
class ProfileConfig:
    """What to profile on, and how many measurements."""

    backend: str = option("onnxruntime", "the runtime the model will run on", choices=BACKENDS)
    threads: Optional[int] = option(None, "ONNX Runtime threads (default: all cores), recorded")
    precision: str = option(
        "fp32", "precision of the ONNX (a .pt is exported in it; INT8 takes its Q/DQ ONNX)", choices=PRECISIONS
    )
    imgsz: Optional[int] = option(None, "export size of a .pt (default: its training size; an ONNX has its own)")
    widths_per_group: int = option(2, "widths timed per group, spread over a fifth to four fifths of it")
    fit_plans: int = option(16, "random whole-model plans timed for the fit")
    check_plans: int = option(10, "random whole-model plans timed to check the predictor (at least 10)")
    rounds: int = option(8, "interleaved rounds per measurement of one group; whole-model plans get twice as many")
    per_round: int = option(3, "calls per round")
    seed: int = option(0, "seed of the random plans")
    multiples: Tuple[int, ...] = (1, 4, 8, 16, 32)  # rounding multiples probed

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise YoloslimError(f"unknown backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise YoloslimError(f"unknown precision {self.precision!r}; use fp32, fp16 or int8")
        if self.threads is not None and self.threads < 1:
            raise YoloslimError(f"threads must be at least 1, got {self.threads}")
        if self.check_plans < 10:
            raise YoloslimError(f"check_plans must be at least 10 for a meaningful check, got {self.check_plans}")
        if min(self.widths_per_group, self.fit_plans, self.rounds, self.per_round) < 1:
            raise YoloslimError("widths_per_group, fit_plans, rounds and per_round must each be at least 1")


# The largest error over a table's unseen check plans at which its predictions are trusted (what profile aims for)
MAX_PREDICTOR_ERROR = 0.10
UNRELIABLE_TABLE = (
    "warning: the predictor missed its check plans by up to {error:.0f} % (trusted up to "
    f"{100 * MAX_PREDICTOR_ERROR:.0f} %): a prune meets the predicted latency, the measured one may differ; profile on "
    "a quieter machine or at a larger imgsz"
)


@dataclass
class LatencyTable:
    """A finished profile: the groups, the predictor, its check, and what the figures depend on."""

    data: dict = field(repr=False)

    @classmethod
    def load(cls, path) -> LatencyTable:
        path = Path(path)
        if not path.is_file():
            raise YoloslimError(f"latency table {path} does not exist; make it with yoloslim profile on the target")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = {}
        finished = isinstance(data, dict) and data.get("format") == TABLE_FORMAT and data.get("complete")
        if not finished or not FINISHED_TABLE_KEYS <= data.keys():
            raise YoloslimError(f"{path} is not a finished latency table; run yoloslim profile again to finish it")
        return cls(data)

    @property
    def predictor(self) -> Predictor:
        return Predictor(Features(self.data["features"]), self.data["predictor"]["coefficients"])

    @property
    def reference_ms(self) -> float:
        return float(self.data["reference_ms"])

    @property
    def round_to(self) -> int:
        return int(self.data["round_to"])

    @property
    def groups(self) -> list:
        return self.data["groups"]

    @property
    def check_error(self) -> float:
        """The predictor's largest relative error over the plans it was checked on, which it never saw."""
        return float(self.data["check"]["max_error"])

    @property
    def reliable(self) -> bool:
        return self.check_error <= MAX_PREDICTOR_ERROR

    @property
    def fastest_measured(self) -> float:
        """The smallest latency ratio the table measured: a prediction under it extrapolates."""
        return min(float(m["ratio"]) for m in self.data["measurements"].values())

    def describe(self) -> str:
        s = self.data["settings"]
        env = self.data["environment"]
        device = env.get("device") or env.get("cpu")
        threads = f", {s['threads']} threads" if s["backend"] == "onnxruntime" else ""
        return f"{s['backend']} {s['precision']}{threads}, {s['imgsz']} px on {device}"


def _read_table(path: Path) -> dict:
    """A table file to continue, or a one-line refusal of a file that is none."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or "measurements" not in data:
        raise YoloslimError(f"{path} exists and is not a latency table; give another --out")
    return data


# What a measurement's speed depends on: a table is continued only where these are the same
_TIMING_KEYS = ("cpu", "cpu_vector_isa", "cores", "machine", "onnxruntime", "tensorrt", "device", "compute_capability")


def _timing_environment(environment) -> dict:
    return {k: (environment or {}).get(k) for k in _TIMING_KEYS}


def _comparable(settings) -> dict:
    """A table's settings without the path the model was given by: its digest names it."""
    return {k: v for k, v in (settings or {}).items() if k != "source"}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def default_table_path(weights: Path, config: ProfileConfig, threads: int) -> Path:
    from yoloslim.utils.assets import is_shipped

    folder = Path("runs") / "profile" if is_shipped(weights) else weights.parent
    return folder / f"{weights.stem}-latency-{config.backend}-{config.precision}-{threads}t.json"


_NOT_ONNX = "{} is not an ONNX model; pass the .onnx that yoloslim export wrote, or the best.pt"


def _onnx_of(weights: Path, config: ProfileConfig, work: Path) -> Path:
    """The ONNX to profile: the file itself, or the export of a .pt (needs torch)."""
    from yoloslim.runtime.onnx_meta import read_onnx_metadata

    if not weights.is_file():
        raise YoloslimError(f"model file {weights} does not exist; pass --weights model.onnx or best.pt")
    if weights.suffix == ".onnx":
        try:
            carried = str(read_onnx_metadata(weights).get("precision", "fp32"))
        except ValueError:  # not a protobuf at all
            raise YoloslimError(_NOT_ONNX.format(weights)) from None
        if carried != config.precision:
            raise YoloslimError(
                f"{weights.name} is a {carried} ONNX; pass --precision {carried}, or the {config.precision} export"
            )
        return weights
    if weights.suffix != ".pt":
        raise YoloslimError(f"{weights.name}: profile takes a .onnx or an Ultralytics .pt")
    if config.precision == "int8":
        raise YoloslimError(
            "INT8 is profiled from its Q/DQ ONNX (calibration needs data); run yoloslim export --precision int8 "
            "--data data.yaml and profile that file"
        )
    try:
        from yoloslim.export import ExportConfig, export
    except ImportError:
        raise YoloslimError("profiling a .pt exports it with torch, which is not installed; pass its ONNX") from None
    ckpt_imgsz = config.imgsz or _training_imgsz(weights)
    return export(weights, ExportConfig(precision=config.precision, imgsz=ckpt_imgsz), out=work / "model.onnx")


def _training_imgsz(weights: Path) -> int:
    from yoloslim.utils.checks import load_detection_checkpoint

    return int((load_detection_checkpoint(weights)[1].get("train_args") or {}).get("imgsz") or 640)


def _static_imgsz(model) -> int:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not all(d.HasField("dim_value") for d in dims):
        raise YoloslimError("profile needs an ONNX with a static input shape; export it without --dynamic")
    return int(dims[2].dim_value)


def _version(package: str) -> Optional[str]:
    """A package's installed version, read from its metadata (importing torch only to ask would take seconds)."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _environment(config: ProfileConfig, threads: int) -> dict:
    """What the figures depend on: the machine, the threads, the runtime's and yoloslim's versions."""
    import platform

    from yoloslim import __version__
    from yoloslim.utils.machine import cpu_name, cpu_vector_isa

    env = {
        "cpu": cpu_name(),
        "cpu_vector_isa": cpu_vector_isa(),
        "cores": os.cpu_count(),
        "threads": threads,
        "machine": f"{platform.machine()} {platform.system()}",
        "python": platform.python_version(),
        "yoloslim": __version__,
        **{name: _version(name) for name in ("onnxruntime", "onnx", "numpy", "tensorrt")},
    }
    if config.backend == "tensorrt":  # JetPack's tensorrt may carry no pip metadata: ask the module
        from yoloslim.runtime.cuda import load_cuda
        from yoloslim.runtime.tensorrt import import_tensorrt

        env["tensorrt"] = import_tensorrt().__version__
        device = load_cuda().device()
        env["device"] = device.get("name")
        env["compute_capability"] = device.get("compute_capability")
    return env


def _loader(config: ProfileConfig):
    from yoloslim.profile.timing import OnnxRuntimeLoader, TensorRTLoader

    if config.backend == "tensorrt":
        return TensorRTLoader(config.precision)
    return OnnxRuntimeLoader(config.threads)


class _Run:
    """One profile: its table on disk, updated after every measurement."""

    def __init__(self, path: Path, fresh: dict, log: Callable[[str], None]):
        self.path, self.log = path, log
        self.data = fresh
        if path.is_file():
            existing = _read_table(path)
            if _comparable(existing.get("settings")) != _comparable(fresh["settings"]):
                raise YoloslimError(
                    f"{path} holds a latency table of another model or settings; give another --out, or repeat "
                    "its settings to continue it"
                )
            if _timing_environment(existing.get("environment")) != _timing_environment(fresh["environment"]):
                raise YoloslimError(
                    f"{path} was measured on another machine or runtime ({existing.get('environment')}); continue it "
                    "there, or give another --out"
                )
            self.data = existing
            log(f"profile: continuing {path} ({len(existing['measurements'])} measurements done)")

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=1))

    def measure_all(self, plans: Dict[str, Dict[str, int]], measure: Callable, sizes: Dict[str, int], rounds) -> None:
        from tqdm import tqdm

        done = self.data["measurements"]
        todo = [k for k in plans if k not in done]
        for key in tqdm(todo, desc="profile", unit="variant", initial=len(plans) - len(todo), total=len(plans)):
            ms, reference_ms, ratio = measure(plans[key], rounds(key))
            done[key] = {"widths": changed(plans[key], sizes), "ms": ms, "reference_ms": reference_ms, "ratio": ratio}
            self.save()


def profile(
    weights,
    config: Optional[ProfileConfig] = None,
    out=None,
    measure: Optional[Callable] = None,
    log: Callable[[str], None] = print,
) -> LatencyTable:
    """Profile `weights` (.onnx, or .pt with torch) on this machine and write its latency table; return it.

    measure(widths, rounds) -> (ms, unpruned ms, ratio) replaces the real timer (tests inject one).
    """
    import tempfile

    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        raise YoloslimError("profile reads the model's graph with the onnx package; pip install onnx") from None

    from yoloslim.profile.timing import Timer

    config = config or ProfileConfig()
    weights = Path(weights)
    threads = config.threads or (1 if config.backend == "tensorrt" else os.cpu_count() or 1)
    path = output_path(out, default_table_path(weights, config, threads), weights)
    with tempfile.TemporaryDirectory(prefix="yoloslim-profile-") as work:
        onnx_path = _onnx_of(weights, config, Path(work))
        try:
            model = onnx.load(str(onnx_path))
        except DecodeError:
            raise YoloslimError(_NOT_ONNX.format(onnx_path)) from None
        imgsz = _static_imgsz(model)
        graph = read_groups(model)
        if not graph.prunable:
            raise YoloslimError(f"{weights.name} has no prunable channel group; nothing to profile")
        features = Features.of_graph(graph)
        sizes = graph.full_widths()
        settings = {
            **{k: v for k, v in asdict(config).items() if k not in ("threads", "imgsz")},
            "multiples": list(config.multiples),
            "threads": threads,
            "imgsz": imgsz,
            "source": str(weights),
            "source_sha256": file_sha256(weights),
        }
        fresh = {
            "format": TABLE_FORMAT,
            "complete": False,
            "settings": settings,
            "environment": _environment(config, threads),
            "groups": [
                {"root": g.root, "convs": g.convs, "size": g.size, "sections": g.sections} for g in graph.prunable
            ],
            "measurements": {},
        }
        run = _Run(path, fresh, log)
        timer = None
        if measure is None:
            timer = Timer(_loader(config), onnx_path, imgsz, config.per_round)

            def measure(widths, rounds):
                return timer(slice_model(graph, widths), rounds)

        try:
            _measure_and_fit(run, config, sizes, features, measure)
        finally:
            if timer is not None:
                timer.close()
    return LatencyTable(run.data)


def _measure_and_fit(run: _Run, config: ProfileConfig, sizes: dict, features: Features, measure: Callable) -> None:
    largest = max(sizes.values())
    multiples = [m for m in config.multiples if m <= largest] or [1]
    probes = {f"probe:{m}": uniform_plan(sizes, PROBE_FRACTION, m) for m in multiples}

    def rounds(key: str) -> int:
        return config.rounds if key.startswith("group:") else 2 * config.rounds

    run.measure_all(probes, measure, sizes, rounds)
    done = run.data["measurements"]
    probed = {m: (done[f"probe:{m}"]["ratio"], features.work(probes[f"probe:{m}"])) for m in multiples}
    round_to = best_multiple(probed)
    plans = {}
    for root, size in sizes.items():
        for w in sweep_widths(size, round_to, config.widths_per_group):
            plans[f"group:{root}:{w}"] = {**sizes, root: w}
    fit = random_plans(sizes, round_to, config.fit_plans, config.seed)
    check = random_plans(sizes, round_to, config.check_plans, config.seed + 1)
    plans.update({f"fit:{i}": p for i, p in enumerate(fit)})
    plans.update({f"check:{i}": p for i, p in enumerate(check)})
    run.measure_all(plans, measure, sizes, rounds)
    seen = [k for k in done if not k.startswith("check:")]
    train = [{**sizes, **done[k]["widths"]} for k in seen] + [dict(sizes)]
    predictor = Predictor.fit(features, train, [done[k]["ratio"] for k in seen] + [1.0])
    check_keys = [f"check:{i}" for i in range(config.check_plans)]
    errors = relative_errors(predictor, check, [done[k]["ratio"] for k in check_keys])
    references = [m["reference_ms"] for m in done.values()]
    run.data.update(
        complete=True,
        round_to=round_to,
        rounding={str(m): {"ratio": r, "work": w, "per_work": r / w} for m, (r, w) in probed.items()},
        reference_ms=float(np.median(references)),
        features=features.to_dict(),
        predictor=predictor.as_dict(),
        check={
            "plans": len(check_keys),
            "max_error": max(errors),
            "mean_error": float(np.mean(errors)),
            "errors": errors,
            "predicted": [predictor(p) for p in check],
            "measured": [done[k]["ratio"] for k in check_keys],
        },
    )
    run.save()


def table_summary(table: LatencyTable) -> str:
    d = table.data
    check = d["check"]
    rounding = ", ".join(f"{m}: {v['per_work']:.3f}" for m, v in d["rounding"].items())
    return "\n".join(
        [
            f"latency table: {table.describe()}",
            f"unpruned model: {table.reference_ms:.2f} ms p50 ({1e3 / table.reference_ms:.1f} FPS)",
            f"prunable groups: {len(d['groups'])}; measurements: {len(d['measurements'])}",
            f"latency per unit of work by rounding multiple ({rounding}): best multiple {table.round_to}",
            f"predictor check over {check['plans']} unseen plans: largest error {100 * check['max_error']:.1f} %, "
            f"mean {100 * check['mean_error']:.1f} %",
            *(
                [UNRELIABLE_TABLE.format(error=100 * error)]
                if (error := table.check_error) > MAX_PREDICTOR_ERROR
                else []
            ),
        ]
    )


__all__ = ["LatencyTable", "ProfileConfig", "profile", "table_summary"]
