"""The check of a weights file shared by every stage (the dataset's is yoloslim.data.check).

It turns what would otherwise be a traceback from deep inside torch or Ultralytics into a YoloslimError
that names the file, the problem and the fix.
"""

from __future__ import annotations

import pickle
import pickletools
import zipfile
from argparse import Namespace
from pathlib import Path

from yoloslim.utils.errors import YoloslimError, first_line

# Checkpoints of github.com/ultralytics/yolov5 pickle classes from its top-level `models` package.
_ORIGINAL_YOLOV5_MODULES = {"models.yolo", "models.common", "models.experimental"}
# Ultralytics' model classes of the other tasks (subclasses included, e.g. YOLOE's segmentation model): the task
# each solves, and its name in Ultralytics.
_OTHER_TASKS = {
    "ClassificationModel": ("a classification", "classify"),
    "SegmentationModel": ("a segmentation", "segment"),
    "SemanticSegmentationModel": ("a semantic segmentation", "semantic"),
    "PoseModel": ("a pose estimation", "pose"),
    "OBBModel": ("an oriented bounding box (OBB)", "obb"),
    "DepthModel": ("a depth estimation", "depth"),
}


def load_detection_checkpoint(weights: str | Path, classic: bool = False):
    """Load an Ultralytics detection checkpoint; return (model, checkpoint dict) or raise a YoloslimError.

    classic: the caller also takes the original YOLOv5 repository's anchor-based checkpoints, returned as
    yoloslim.models' DetectionModel (FP32, eval mode) and the checkpoint dict; otherwise they are refused."""
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint

    from yoloslim.models import DetectionModel as ClassicDetectionModel
    from yoloslim.models import load_classic_checkpoint
    from yoloslim.models.train import original_model

    path = Path(weights)
    if path.is_dir():
        raise YoloslimError(
            f"{path} is a folder; pass the checkpoint file, e.g. --weights {path / 'weights' / 'best.pt'}"
        )
    if not path.is_file():
        raise YoloslimError(f"weights file {path} does not exist; pass --weights path/to/best.pt")
    if path.suffix != ".pt":
        raise YoloslimError(
            f"{path} is not a PyTorch checkpoint (.pt); pass the best.pt that Ultralytics training wrote"
        )
    # Checked before Ultralytics sees the file: it maps a name like yolov5s.pt to yolov5su.pt and downloads that.
    if in_original_format(path):
        classic_model, ckpt = load_classic_checkpoint(path)  # refuses another task, unknown modules, damaged files
        if classic:
            return classic_model, ckpt
        raise YoloslimError(_anchor_based_refusal(path))
    try:
        model, ckpt = load_checkpoint(path)
    # TypeError and friends: torch's legacy loader on junk; AttributeError: a file that holds no checkpoint dict
    except (TypeError, ModuleNotFoundError, ValueError, AttributeError, pickle.UnpicklingError) as e:
        raise YoloslimError(
            f"{path} is not a loadable Ultralytics checkpoint ({first_line(e)}); pass another file"
        ) from None
    task = other_task(model)
    if task:
        raise YoloslimError(f"{path} is {task}; yoloslim slims detection models only, pass a detection best.pt")
    if isinstance(model, ClassicDetectionModel):  # a classic run's own checkpoint: last.pt while it trains, epochN.pt
        if classic:
            return original_model(model).float().eval(), ckpt
        raise YoloslimError(_anchor_based_refusal(path))
    if type(model) is not DetectionModel:  # a detector of another family: YOLO-World, YOLOE, RT-DETR
        raise YoloslimError(
            f"{path} is a {type(model).__name__}; yoloslim slims Ultralytics DetectionModel checkpoints only, pass one"
        )
    return model, ckpt


def check_model_yaml(cfg: str | Path) -> None:
    """Refuse, in one line, what Ultralytics cannot build a detector from: a missing file, another file type, a
    dataset yaml, a model of another task. Ultralytics' own model names (yolov8n.yaml) need no file here."""
    from ultralytics.nn.tasks import guess_model_task, yaml_model_load

    if Path(cfg).suffix not in (".yaml", ".yml"):
        raise YoloslimError(f"{cfg} is neither a checkpoint (.pt) nor a model yaml; pass best.pt or e.g. yolov8n.yaml")
    try:
        spec = yaml_model_load(cfg)
    except (FileNotFoundError, OSError) as e:
        raise YoloslimError(f"model yaml {cfg} not found ({first_line(e)}); pass an existing file") from None
    if not isinstance(spec, dict) or not {"backbone", "head"} <= set(spec):
        raise YoloslimError(f"{cfg} is not a model yaml (no backbone: and head:); a dataset yaml goes to --data")
    task = guess_model_task(spec)
    if task != "detect":
        raise YoloslimError(f"{cfg} describes a {task} model; yoloslim slims detection models, pass a detection yaml")


def _anchor_based_refusal(path: Path) -> str:
    return (
        f"{path} is an anchor-based checkpoint from the original YOLOv5 repository, which this command does not take "
        "yet; train, prune, finetune, export, eval, bench and slim take it, or retrain it with the ultralytics "
        "package (model yolov5n.yaml) and pass that best.pt"
    )


def other_task(model) -> str | None:
    """The task, other than detection, that `model` solves, as "a segmentation model (task segment)" reads; None for
    a detector."""
    from ultralytics.nn import tasks

    for name, (kind, task) in _OTHER_TASKS.items():
        model_class = getattr(tasks, name, None)  # the newer tasks' classes are missing from older 8.4 releases
        if model_class and isinstance(model, model_class):
            return f"{kind} model (task {task})"
    return None


def in_original_format(path: str | Path) -> bool:
    """Whether a .pt file pickles the original YOLOv5 repository's classes (its top-level `models` package)."""
    return str(path).endswith(".pt") and bool(pickled_modules(Path(path)) & _ORIGINAL_YOLOV5_MODULES)


def pickled_globals(path: Path) -> list[tuple[str, str]]:
    """(module, name) of each global a torch checkpoint's pickle refers to, read without executing it."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            data = archive.read(name)
    except (zipfile.BadZipFile, StopIteration, OSError):
        return []  # not a zip checkpoint; the loader reports what is wrong
    found, strings = [], []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                found.append(tuple(arg.split(" ", 1)))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append((strings[-2], strings[-1]))
            elif isinstance(arg, str):
                strings.append(arg)
    except ValueError:
        pass  # a damaged pickle: keep what was read, the loader reports the damage
    return found


def pickled_modules(path: Path) -> set[str]:
    """Modules whose classes a torch checkpoint references, read from its pickle without executing it."""
    return {module for module, _ in pickled_globals(path)}


def trained_imgsz(ckpt: dict) -> int | None:
    """The square size a checkpoint was trained at (Ultralytics' train_args, the original repository's opt: imgsz, or
    img_size before its v6.0), if any."""
    args = ckpt.get("train_args") or ckpt.get("opt") or {}
    args = vars(args) if isinstance(args, Namespace) else args
    imgsz = args.get("imgsz", args.get("img_size")) if isinstance(args, dict) else None
    imgsz = imgsz[0] if isinstance(imgsz, (list, tuple)) and imgsz else imgsz
    return imgsz if isinstance(imgsz, int) else None
