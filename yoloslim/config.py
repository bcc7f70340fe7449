"""Every stage's settings and their defaults, stated once.

The defaults are the recipe measured to work (docs/sparsity.md, docs/pruning.md, docs/finetuning.md): `yoloslim train`
with no option runs it and stops once the prune is ready, `yoloslim slim` splits its epoch budget the way the
measurements say. The CLI builds its options from these fields and their `help`; `slim`, the tools and the docs read
them from here. Torch-free, so the device's command line imports it; kept to Python 3.8 typing for the same reason.
"""

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, Optional

from yoloslim.utils.errors import YoloslimError

Schedule = Literal["constant", "linear", "cosine"]
SCHEDULES = ("constant", "linear", "cosine")


def option(default, help: str, **cli):
    """A settings field with its command-line help (and argparse extras such as metavar)."""
    return field(default=default, metadata={"help": help, **cli})


def changed_options(settings: type, values) -> list[str]:
    """The command-line flags of the fields of a settings dataclass whose value in `values` (an instance, or parsed
    arguments) is not the field's default."""
    changed = [f.name for f in fields(settings) if getattr(values, f.name, f.default) != f.default]
    return ["--" + name.replace("_", "-") for name in changed]


@dataclass(frozen=True)
class TrainRecipe:
    """The Ultralytics train arguments of a measured recipe; the user's key=value arguments override each."""

    epochs: int
    batch: int
    optimizer: str
    lr0: Optional[float] = None  # None: Ultralytics' own (optimizer=auto fits it to the classes)
    nbs: Optional[int] = None  # nominal batch: gradient accumulation over nbs / batch batches
    close_mosaic: Optional[int] = None

    def train_args(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


# Sparsity training, targeted (the default): the plan, not the optimizer, picks the gammas that shrink, so the stage
# trains with the finetune's optimizer and batch; under SGD at lr0 0.01 the license-plate YOLO11n fell to 0.010
# mAP50-95 by its third epoch, under this recipe the same targets reached zero by the fifth with the model at 0.14
# (docs/sparsity.md). nbs 8 makes every batch an optimizer step and so a penalty step: at Ultralytics' nbs 64 (a step
# per 4 batches of 16) the license-plate YOLO26n's targeted gammas fell 0.07 an epoch instead of 0.2 to 0.3.
SPARSITY_RECIPE = TrainRecipe(epochs=30, batch=16, optimizer="auto", nbs=8, close_mosaic=5)
# The uniform penalty (every prunable gamma pays): SGD, since Adam-family optimizers normalise each gamma's gradient
# and the gammas shrink together instead of splitting; one penalty step per batch of 8; measured on the license-plate
# YOLOv5n.
UNIFORM_SPARSITY_RECIPE = TrainRecipe(epochs=30, batch=8, optimizer="SGD", lr0=0.01, nbs=8, close_mosaic=5)
# sr per route: the step is learning rate x sr, and AdamW's rate under optimizer=auto is about a fifth of SGD's 0.01.
# Targeted at sr 1, the planned channels fade over 10 to 20 epochs while the rest keeps training, so the finetune starts
# from a trained model: the license-plate YOLOv8n, YOLO11n and classic YOLOv5n finetunes ended 0.2, 0.0 and 0.5 under
# their controls (seed 1), where sr 3, which zeroes the targets within 5 epochs with the model at its lowest, ended 2.2,
# 3.5 (seed 0) and 0.5 under (docs/sparsity.md). A budget too short for the slower stage takes sr 3.
TARGETED_SR = 1.0
UNIFORM_SR = 0.1


def route_sr(targeted: bool) -> float:
    """The sr a route was measured with: what SparsityConfig takes when none is given."""
    return TARGETED_SR if targeted else UNIFORM_SR


# Finetuning a pruned model: Ultralytics' optimizer=auto, which for runs under 10,000 iterations is AdamW at
# lr0 0.002 * 5 / (4 + classes) with the biases' warm-up from zero. The license-plate measurements (one class) ran at
# its 0.002; on the six-class demo an explicit 0.002 lost 3.4 points in a 5-epoch finetune that auto's 0.0014 did not.
FINETUNE_RECIPE = TrainRecipe(epochs=20, batch=16, optimizer="auto", close_mosaic=5)
# The gamma a finetune gives each BatchNorm channel whose gamma is exactly zero before its first step (0: none; see
# yoloslim.finetune.revive_dead_channels). Off: at 0.01 the license-plate YOLOv5nu and YOLO11n prunes trained their
# dead stride-32 stages again and ended +0.1 and +0.5 point, inside the noise (docs/finetuning.md).
REVIVE_GAMMA = 0.0


INT8_TARGETS = ("tensorrt", "cpu")  # the INT8 flavours: Q/DQ placed for TensorRT, or for ONNX Runtime's CPU kernels


@dataclass(frozen=True)
class QatConfig:
    """Quantization-aware finetuning: INT8 fake quantization where the INT8 export for `target` puts Q/DQ."""

    qat: bool = option(
        False,
        "finetune with INT8 fake quantization placed where export --precision int8 --target TARGET puts Q/DQ; that "
        "export then takes the trained ranges, without calibration data",
    )
    target: Literal["tensorrt", "cpu"] = option(
        "tensorrt", "the INT8 flavour qat trains for: tensorrt (engines) or cpu (ONNX Runtime)", choices=INT8_TARGETS
    )
    # The export's own default: qat starts from exactly the ranges that post-training quantization would use.
    calibration_images: int = option(500, "training images that calibrate qat's ranges before the first step")
    # The ranges are calibrated with BatchNorm's running statistics, which export folds into the convolutions. Freezing
    # them is the usual QAT advice, but measured on the sparse model's prune (docs/deployment.md) it gained nothing at
    # lr_scale 0.1 and made the losses diverge at the finetune's own rate, so BatchNorm trains as in finetuning.
    freeze_bn: bool = option(
        False, "keep BatchNorm's running statistics fixed during qat (gamma and beta still learn), as export folds them"
    )
    # The finetune's own rate cost the prune's QAT 6 points below its starting PTQ; a tenth of it gained (docs/).
    lr_scale: float = option(
        0.1, "qat's learning rate as a fraction of the finetune's (lr0, or the one optimizer=auto picks)"
    )

    def __post_init__(self):
        if self.target not in INT8_TARGETS:
            raise YoloslimError(f"unknown INT8 target {self.target!r}; use tensorrt or cpu")
        if self.calibration_images < 1:
            raise YoloslimError(f"calibration_images must be at least 1, got {self.calibration_images}")
        if not 0 < self.lr_scale <= 1:
            raise YoloslimError(f"lr_scale must be in (0, 1], got {self.lr_scale}")


@dataclass(frozen=True)
class SparsityConfig:
    """How hard and where to push BatchNorm gammas towards zero, and when to stop."""

    sr: Optional[float] = option(
        None, f"L1 strength on gamma, per unit learning rate (default {TARGETED_SR}; {UNIFORM_SR} with --no-targeted)"
    )
    schedule: Schedule = option("constant", "sr schedule over the epochs", choices=SCHEDULES)
    final_ratio: float = option(0.0, "sr at the last epoch as a fraction of sr (linear and cosine schedules)")
    include_head: bool = option(
        True, "also shrink the Detect head's inner BatchNorms (about 40%% of a nano model's CPU latency)"
    )
    # End the run once removing the channels whose |gamma| is below zero_gamma (at the prune's rounding) keeps at most
    # this fraction of the GFLOPs: from then on a prune to that size is lossless, and further epochs under the penalty
    # only cost accuracy that the finetune must win back.
    stop_at_flops: Optional[float] = option(
        0.5,
        "end once pruning the channels with |gamma| < zero_gamma keeps at most this fraction of the GFLOPs "
        "(checked each epoch; 0 trains all epochs, with --no-targeted only)",
        metavar="FRACTION",
    )
    # Targeted: the penalty falls only on the channels that a prune to stop_at_flops would remove if made now, chosen
    # again at each epoch start by the later prune's own plan, so the channels it keeps train as in the control run
    # instead of shrinking with the rest. At sr 3 on four license-plate models it ended 1.3 to 3.5 points under the
    # control where the uniform penalty ended 2.6 to 10.0 under, and its prunes ran INT8 on the CPU at 0.56 to 0.72 of
    # FP32 (docs/sparsity.md).
    targeted: bool = option(
        True,
        "penalise only the channels a prune to stop_at_flops would remove now (chosen each epoch); --no-targeted: "
        "every prunable gamma (Network Slimming's uniform penalty, trained with its SGD recipe)",
    )
    zero_gamma: float = option(1e-2, "|gamma| below which a channel counts as zeroed, for stop_at_flops")
    # Under an Adam-family optimizer a parameter's step is at most about lr, the penalty's lr x sr at sr 1: a few
    # targets whose gradient holds steady can hover above zero for good. The license-plate YOLO11n at sr 1 stood a few
    # channels short (0.501) from epoch 18 to the stage's last, 30, and the prune that cut them live lost 2.3 points;
    # the YOLOv8n's stood still 4 epochs before its last targets gave way, so the stage waits one more.
    stall_epochs: int = option(
        5,
        "targeted, constant schedule: once the zeroed channels have not grown for this many epochs, the targets left "
        "resist the penalty and sr triples (again after each such stall); 0 never",
    )
    round_to: int = option(8, "the rounding the later prune will use, for stop_at_flops")
    min_keep: float = option(0.1, "the later prune's per-layer minimum fraction, for stop_at_flops")

    def __post_init__(self):
        if self.sr is None:
            object.__setattr__(self, "sr", route_sr(self.targeted))
        if not (isinstance(self.sr, (int, float)) and math.isfinite(self.sr) and self.sr >= 0):
            raise YoloslimError(
                f"sr must be a finite number >= 0, got {self.sr}; the measured recipes use sr={TARGETED_SR} "
                f"(targeted) and sr={UNIFORM_SR} (--no-targeted)"
            )
        if self.schedule not in SCHEDULES:
            raise YoloslimError(f"unknown sr schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if not 0 <= self.final_ratio <= 1:
            raise YoloslimError(f"final_ratio must lie in [0, 1], got {self.final_ratio}")
        if self.targeted and not self.include_head:
            raise YoloslimError(
                "--no-include-head takes the uniform penalty: the targeted one follows the prune's plan, which cuts "
                "the head's inner channels too; add --no-targeted"
            )
        if self.stop_at_flops == 0:
            object.__setattr__(self, "stop_at_flops", None)
        if self.stop_at_flops is not None and not 0 < self.stop_at_flops < 1:
            raise YoloslimError(
                "stop_at_flops is the fraction of GFLOPs a prune of the zeroed channels keeps, in (0, 1), or 0 for "
                f"no early stop; got {self.stop_at_flops}"
            )
        if self.targeted and self.stop_at_flops is None:
            raise YoloslimError(
                "targeted sparsity aims at the prune to stop_at_flops; give stop_at_flops a fraction, or turn "
                "targeted off (--no-targeted) to penalise every gamma for all epochs"
            )
        if self.stall_epochs < 0:
            raise YoloslimError(f"stall_epochs must be >= 0 (0: sr never rises), got {self.stall_epochs}")
        if not self.zero_gamma > 0 or self.round_to < 1 or not 0 <= self.min_keep <= 1:  # `not >`: NaN fails too
            raise YoloslimError(
                f"zero_gamma must be > 0, round_to >= 1 and min_keep in [0, 1], got {self.zero_gamma}, "
                f"{self.round_to} and {self.min_keep}"
            )

    def recipe(self) -> TrainRecipe:
        """The Ultralytics train arguments this route was measured with."""
        return SPARSITY_RECIPE if self.targeted else UNIFORM_SPARSITY_RECIPE

    def sr_at(self, epoch: int, epochs: int) -> float:
        """Penalty strength during `epoch` (0-based) of a run of `epochs` epochs."""
        progress = min(max(epoch / max(epochs - 1, 1), 0.0), 1.0)
        if self.schedule == "constant":
            return self.sr
        if self.schedule == "linear":
            decay = 1 - progress
        else:
            decay = 0.5 * (1 + math.cos(math.pi * progress))
        return self.sr * (self.final_ratio + (1 - self.final_ratio) * decay)


# Half the GFLOPs: the size at which the measured prunes ran at 0.88 to 0.96 of the reduction on one CPU thread.
DEFAULT_TARGET_FLOPS = 0.5


# Rounding when no latency table says better: FP16 tensor cores take channels in multiples of 8.
DEFAULT_ROUND_TO = 8
_AMOUNTS = ("ratio", "threshold", "target_flops", "target_latency", "target_fps")


@dataclass(frozen=True)
class PruneConfig:
    """How much to prune and how. Give at most one of ratio, threshold, target_flops, target_latency and target_fps;
    with none, target_flops is DEFAULT_TARGET_FLOPS. The latency targets need latency_table."""

    method: Literal["bn", "l1"] = option(
        "bn",
        "channel score: bn = BatchNorm |gamma| (after sparsity training); l1 = filter L1 norm (without)",
        choices=("bn", "l1"),
    )
    ratio: Optional[float] = option(None, "fraction of prunable channels to remove, before rounding")
    threshold: Optional[float] = option(None, "remove channels whose score is below this")
    target_flops: Optional[float] = option(
        None, f"fraction of the original GFLOPs to keep ({DEFAULT_TARGET_FLOPS} when no amount is given)"
    )
    target_latency: Optional[float] = option(
        None, "fraction of the unpruned model's latency on the profiled target to reach (needs latency_table)"
    )
    target_fps: Optional[float] = option(
        None, "frames per second to reach on the profiled target (needs latency_table)"
    )
    latency_table: Optional[str] = option(
        None, "latency table of the target from yoloslim profile: for the latency targets and the predicted latency"
    )
    min_keep: float = option(0.1, "per-layer minimum fraction of channels kept")
    round_to: Optional[int] = option(
        None,
        f"kept widths are multiples of this (default {DEFAULT_ROUND_TO}, or the latency table's best multiple; "
        "8: TensorRT FP16; 32: INT8 on Orin; 16: ONNX Runtime on AVX-512 CPUs; 1: off)",
    )
    compensate: bool = option(True, "fold removed channels' constant output into their consumers")
    imgsz: int = option(640, "image size of the GFLOPs figures (a multiple of 32)")

    def __post_init__(self):
        given = [k for k in _AMOUNTS if getattr(self, k) is not None]
        if len(given) > 1:
            raise YoloslimError(
                "give only one of ratio, threshold and target_flops (or one latency target, target_latency or "
                f"target_fps), not {' and '.join(given)}"
            )
        if not given:
            object.__setattr__(self, "target_flops", DEFAULT_TARGET_FLOPS)
        self._check_latency_target()
        if self.round_to is None and self.latency_table is None:
            object.__setattr__(self, "round_to", DEFAULT_ROUND_TO)
        if self.method not in ("bn", "l1"):
            raise YoloslimError(f"unknown pruning criterion {self.method!r}; use bn or l1")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise YoloslimError(f"ratio must lie in [0, 1), got {self.ratio}")
        if self.target_flops is not None and not 0 < self.target_flops <= 1:
            raise YoloslimError(f"target_flops is the fraction of GFLOPs to keep, in (0, 1]; got {self.target_flops}")
        if self.threshold is not None and not self.threshold >= 0:  # NaN fails too
            raise YoloslimError(f"threshold must be >= 0, got {self.threshold}")
        if not 0 <= self.min_keep <= 1:
            raise YoloslimError(f"min_keep is a fraction of each layer's channels, in [0, 1]; got {self.min_keep}")
        if self.round_to is not None and self.round_to < 1:
            raise YoloslimError(f"round_to must be >= 1, got {self.round_to}")
        # Ultralytics' GFLOPs count is 0 for other sizes, which would void target_flops
        if self.imgsz < 32 or self.imgsz % 32:
            raise YoloslimError(f"imgsz must be a multiple of 32 (the detector's largest stride), got {self.imgsz}")

    def _check_latency_target(self) -> None:
        if self.target_latency is not None and not 0 < self.target_latency <= 1:
            raise YoloslimError(
                f"target_latency is the fraction of the unpruned latency to reach, in (0, 1]; got {self.target_latency}"
            )
        if self.target_fps is not None and not self.target_fps > 0:
            raise YoloslimError(f"target_fps must be > 0, got {self.target_fps}")
        if (self.target_latency is not None or self.target_fps is not None) and self.latency_table is None:
            raise YoloslimError(
                "target_latency and target_fps need latency_table, the table yoloslim profile measured on the target"
            )


_QAT_FIELDS = {f.name: f for f in fields(QatConfig)}

# slim's epoch budget beyond the base: 50 gave the measured license-plate results, the targeted sparsity stage taking 5
# to 7 of them (docs/sparsity.md); the demo ships its sparsity training, so its budget is a short finetune.
DEFAULT_EPOCHS = 50
DEMO_EPOCHS = 5
# the latency table slim profiles (or copies its latency_table to), in the run folder
SLIM_LATENCY_TABLE = "latency.json"


@dataclass(frozen=True)
class SlimConfig:
    """The whole pipeline: one epoch budget split between sparsity training and finetuning."""

    weights: Optional[str] = option(None, "detection checkpoint (default: the shipped sparsity-trained demo model)")
    data: Optional[str] = option(None, "dataset yaml (default: the embedded synthetic dataset)")
    target_flops: Optional[float] = option(
        None, f"fraction of the GFLOPs to keep ({DEFAULT_TARGET_FLOPS} unless ratio is given)"
    )
    ratio: Optional[float] = option(None, "fraction of prunable channels to remove instead of target_flops")
    method: Literal["bn", "l1"] = option(
        "bn",
        "pruning criterion: bn trains sparsity first and prunes by BatchNorm |gamma|; l1 prunes the input by filter L1 "
        "norm and finetunes for the whole budget",
        choices=("bn", "l1"),
    )
    target_latency: Optional[float] = option(
        None,
        "instead of target_flops: fraction of the unpruned model's latency to reach on the latency table's device "
        "(this machine when slim profiles it)",
    )
    target_fps: Optional[float] = option(
        None, "instead of target_flops: frames per second to reach on the latency table's device (or this machine)"
    )
    latency_table: Optional[str] = option(
        None,
        "latency table of this model from yoloslim profile, reused for the latency targets (default: slim profiles "
        f"the model with ONNX Runtime FP32 at the run's threads into the run's {SLIM_LATENCY_TABLE})",
    )
    round_to: Optional[int] = option(
        None,
        f"kept widths are multiples of this, in sparsity training's plan and the prune (default {DEFAULT_ROUND_TO}, "
        "for TensorRT FP16; 16 suits ONNX Runtime on AVX-512, 32 TensorRT INT8 on Orin; with a latency target, the "
        "table's best multiple)",
    )
    epochs: Optional[int] = option(
        None,
        "epoch budget beyond the base: sparsity training stops once the prune is ready (using at most sparse_share of "
        f"the budget), finetuning gets the rest (default {DEFAULT_EPOCHS}; {DEMO_EPOCHS} for the shipped demo, whose "
        "sparsity training is done)",
    )
    sparse_share: float = option(0.6, "the largest share of the budget that sparsity training may use")
    sr: Optional[float] = option(
        None, f"L1 strength of sparsity training's targeted penalty, as yoloslim train --sr (default {TARGETED_SR})"
    )
    imgsz: Optional[int] = option(None, "training and evaluation size (default: the checkpoint's own)")
    precision: Literal["fp16", "int8"] = option("int8", "deployment precision to prepare", choices=("fp16", "int8"))
    qat: bool = option(
        False,
        "end the finetune with qat_epochs of its epochs quantization-aware (finetune --qat) for qat_target, whose "
        "INT8 export takes the trained ranges; both placements' post-training INT8 of the float finetune stay beside "
        "it for comparison",
    )
    qat_target: Literal["tensorrt", "cpu"] = option(
        _QAT_FIELDS["target"].default, _QAT_FIELDS["target"].metadata["help"], choices=INT8_TARGETS
    )
    # Two QAT epochs after the float ones: on the demo's prune they kept both flavours within half a point of the
    # float model trained as long, where one left the CPU flavour 0.8 under (docs/deployment.md)
    qat_epochs: int = option(2, "of the finetune's epochs, how many are quantization-aware (the last ones), with qat")
    threads: Optional[int] = option(
        None,
        "CPU threads for profiling, evaluation and benchmark (default: all cores; the benchmark also times 1 thread)",
    )
    project: str = option("runs/slim", "runs go to PROJECT/NAME")
    name: str = option("slim", "run folder; an unfinished run of this name is resumed")

    def __post_init__(self):
        if self.precision not in ("fp16", "int8"):
            raise YoloslimError(f"precision must be fp16 or int8, got {self.precision}")
        if self.epochs is not None and self.epochs < 1:
            raise YoloslimError(f"epochs is the budget beyond the base, at least 1; got {self.epochs}")
        if not 0 < self.sparse_share < 1:
            raise YoloslimError(f"sparse_share must lie in (0, 1), got {self.sparse_share}")
        if self.threads is not None and self.threads < 1:
            raise YoloslimError(f"threads must be at least 1, got {self.threads}")
        if self.target_flops == 1:
            raise YoloslimError(
                "target_flops 1 keeps every GFLOP, so there is nothing to slim; give a fraction below 1"
            )
        if self.sr is not None:
            if self.method == "l1":
                raise YoloslimError("sr sets sparsity training's penalty, which method l1 skips; drop sr")
            SparsityConfig(sr=self.sr)  # a bad strength is refused before any work
        # a bad amount or criterion is refused before any work
        self.prune_config(32, self.latency_table or SLIM_LATENCY_TABLE, self.method)
        self._check_qat()

    def _check_qat(self) -> None:
        if self.qat_target not in INT8_TARGETS:
            raise YoloslimError(f"unknown INT8 target {self.qat_target!r} for qat_target; use tensorrt or cpu")
        if self.qat_epochs < 1:
            raise YoloslimError(f"qat_epochs must be at least 1, got {self.qat_epochs}")
        if self.qat and self.precision != "int8":
            raise YoloslimError("qat prepares the INT8 export; set precision int8, or drop qat")
        defaults = {f.name: f.default for f in fields(self)}
        given = [f"{k} {getattr(self, k)}" for k in ("qat_target", "qat_epochs") if getattr(self, k) != defaults[k]]
        if given and not self.qat:
            raise YoloslimError(f"{' and '.join(given)} set the quantization-aware finetune; add qat, or drop them")

    def qat_config(self) -> QatConfig:
        """The quantization-aware finetune's settings: qat_target, the rest QatConfig's defaults."""
        return QatConfig(qat=True, target=self.qat_target)

    @property
    def latency_target(self) -> bool:
        return self.target_latency is not None or self.target_fps is not None

    def prune_config(self, imgsz: int, latency_table: Optional[str] = None, method: str = "bn") -> PruneConfig:
        return PruneConfig(
            method=method,
            ratio=self.ratio,
            target_flops=self.target_flops,
            target_latency=self.target_latency,
            target_fps=self.target_fps,
            latency_table=latency_table,
            round_to=self.round_to,
            imgsz=imgsz,
        )
