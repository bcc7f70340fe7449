"""Ultralytics' YOLO dataset format, read the way Ultralytics reads it.

A data.yaml names the dataset's root (`path:`, else the yaml's folder), its splits (`train:`, `val:`, optionally
`test:`: image folders, image-list .txt files, or lists of them, relative to the root) and its classes (`names:`, or
only `nc:`). Each image's labels lie in a .txt file at the image's path with its last `images` folder replaced by
`labels`, or beside the image when there is no such folder: one object per line, `class cx cy w h` or a polygon
`class x1 y1 x2 y2 ...`, in fractions of the image size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from yoloslim.utils.errors import YoloslimError

# Ultralytics' IMG_FORMATS (a test keeps them equal; the torch-free install has no Ultralytics to read them from)
IMAGE_SUFFIXES = frozenset(
    {".avif", ".bmp", ".dng", ".heic", ".heif", ".jp2", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp"}
)
YAML_SUFFIXES = (".yaml", ".yml")
_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetYaml:
    """A parsed dataset yaml: its file, the root its splits are relative to, each split's entries, class names."""

    file: Path
    root: Path
    splits: dict  # split -> its entry as written: a path, or a list of paths
    names: dict  # class id -> name
    relative_root: str | None = None  # path: as written, when relative (found from the working directory)

    @classmethod
    def read(cls, data_yaml: str | Path) -> DatasetYaml:
        file = Path(data_yaml)
        spec = _load_mapping(file)
        if "validation" in spec and "val" not in spec:  # Ultralytics reads it as val:
            spec["val"] = spec.pop("validation")
        missing = [f"{k}:" for k in ("train", "val") if not spec.get(k)]
        if spec.get("names") is None and spec.get("nc") is None:
            missing.append("names:")
        if missing:
            raise YoloslimError(
                f"{file} does not give {' or '.join(missing)}; a dataset yaml needs train: and val: (image folders, "
                "image-list .txt files or lists of them) and names: (the class names)"
            )
        splits = {split: _split_entry(file, split, spec[split]) for split in _SPLITS if spec.get(split)}
        given = spec.get("path")
        relative = given if isinstance(given, str) and given and not Path(given).is_absolute() else None
        return cls(file, _dataset_root(file, given), splits, _class_names(file, spec), relative)

    def images(self, split: str) -> list[Path]:
        """The split's image paths, in Ultralytics' order; a location that does not exist is refused."""
        return [Path(f) for f in self.image_files(split)]

    def image_files(self, split: str) -> list[str]:
        """images() as absolute path strings: a large split lists several times faster without Path objects."""
        if split not in self.splits:
            raise YoloslimError(
                f"{self.file} has no '{split}' split; choose one of {', '.join(self.splits)}, or add {split}: to it"
            )
        files = []
        for location in self.locations(split):
            files += _image_files_at(location, split, self)
        return sorted(files)

    def locations(self, split: str) -> list[Path]:
        """Ultralytics' resolution: each entry below the root; a string starting ../ that is not found there is tried
        without it (what makes the yaml of a Roboflow export, which lies inside its root, work)."""
        entry = self.splits[split]
        if isinstance(entry, list):
            return [(self.root / e).resolve() for e in entry]
        located = (self.root / entry).resolve()
        if not located.exists() and entry.startswith("../"):
            return [(self.root / entry[3:]).resolve()]
        return [located]


def split_images(data_yaml: str | Path, split: str = "val") -> tuple[list[Path], dict]:
    """Image paths of a split of an Ultralytics dataset yaml, and its class names."""
    dataset = DatasetYaml.read(data_yaml)
    return dataset.images(split), dataset.names


def label_path(image: Path) -> Path:
    """Ultralytics' convention: the last images folder in the path becomes labels, the suffix .txt; with no images
    folder, the label lies beside the image."""
    return Path(label_file(str(Path(image).absolute())))


def label_file(image: str) -> str:
    """label_path of an absolute image path string, as Ultralytics' img2label_paths computes it."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return os.path.splitext(labels.join(image.rsplit(images, 1)))[0] + ".txt"


def read_labels(image: Path, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth boxes (xyxy pixels) and classes of an image from its YOLO txt label file."""
    path = label_path(image)
    lines = path.read_text(encoding="utf-8-sig").splitlines() if path.is_file() else []
    rows = np.array([_label_row(path, line) for line in lines if line.strip()], dtype=np.float64).reshape(-1, 5)
    h, w = shape
    cx, cy, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
    return boxes, rows[:, 0].astype(np.int64)


def label_box(line: str) -> list[float] | None:
    """`class cx cy w h` of one label line, a polygon boxed by its extent as Ultralytics does; None when the line is
    neither."""
    try:
        values = [float(v) for v in line.split()]
    except ValueError:
        return None
    if len(values) == 5:
        return values
    if len(values) >= 7 and len(values) % 2:
        xs, ys = values[1::2], values[2::2]
        return [values[0], (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
    return None


def _label_row(path: Path, line: str) -> list[float]:
    row = label_box(line)
    if row is None:
        raise YoloslimError(
            f"{path}: cannot read the label line {line.strip()!r}; YOLO labels are 'class cx cy w h' or a polygon, "
            "one per line"
        )
    return row


def _load_mapping(file: Path) -> dict:
    import yaml

    if not file.is_file():
        raise YoloslimError(
            f"dataset yaml {file} does not exist; pass --data path/to/data.yaml, or leave --data out to use the "
            "embedded synthetic dataset"
        )
    if file.suffix.lower() not in YAML_SUFFIXES:  # Ultralytics reads data.YAML too
        raise YoloslimError(f"{file} is not a dataset yaml; pass --data path/to/data.yaml")
    try:
        spec = yaml.safe_load(file.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise YoloslimError(f"{file} is not a text file; a dataset yaml is YAML text") from None
    except yaml.YAMLError as e:
        raise YoloslimError(f"{file} is not valid YAML ({_yaml_problem(e)}); fix the syntax there") from None
    if not isinstance(spec, dict):
        held = "nothing" if spec is None else f"a {type(spec).__name__}"
        raise YoloslimError(f"{file} holds {held}, not keys and values; a dataset yaml gives train:, val: and names:")
    return spec


def _yaml_problem(error) -> str:
    """Where and what, on one line: the parser's own message spans several."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def _split_entry(file: Path, split: str, value) -> str | list:
    if not all(isinstance(e, str) and e for e in (value if isinstance(value, list) else [value])):
        raise YoloslimError(
            f"{file}: {split}: {value!r} is not a path; give an image folder or an image-list .txt file (or a list of "
            "them), relative to the dataset root"
        )
    return value


def _class_names(file: Path, spec: dict) -> dict:
    """names: as a list or as {id: name} with ids 0..n-1; with only nc:, Ultralytics' class_0, class_1, ..."""
    names, nc = spec.get("names"), spec.get("nc")
    if isinstance(nc, str) and nc.strip().isdigit():  # nc: '3'
        nc = int(nc)
    if names is None:
        if not isinstance(nc, int) or nc < 1:
            raise YoloslimError(f"{file}: nc: {nc!r} is not a class count; give names: (the class names) instead")
        return {i: f"class_{i}" for i in range(nc)}
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise YoloslimError(f"{file}: names: {names!r} is not a list of class names; write names: [first, second]")
    try:
        ids = sorted(int(k) for k in names)
    except (TypeError, ValueError):
        ids = []
    if ids != list(range(len(names))):
        raise YoloslimError(
            f"{file}: names: has ids {', '.join(map(str, names))}; number the classes 0 to {len(names) - 1}"
        )
    if nc is not None and nc != len(names):
        raise YoloslimError(f"{file}: nc: {nc} but names: has {len(names)} classes; make them agree, or drop nc:")
    return {int(k): str(v) for k, v in names.items()}


def _dataset_root(file: Path, given) -> Path:
    """Ultralytics' rule: path: as given, a relative one from the working directory where it exists there, else from
    Ultralytics' datasets_dir setting; without path:, the yaml's folder."""
    if not given:
        return file.parent.resolve()
    if not isinstance(given, str):
        raise YoloslimError(f"{file}: path: {given!r} is not a folder; give the dataset root, or drop path:")
    root = Path(given)
    if root.is_absolute() or root.exists():
        return root.resolve()
    return _ultralytics_datasets_dir() / root


def _ultralytics_datasets_dir() -> Path:
    try:
        from ultralytics.utils import DATASETS_DIR
    except ImportError:  # the torch-free install has no Ultralytics settings: the working directory stands in
        return Path.cwd()
    return Path(DATASETS_DIR)


def _image_files_at(location: Path, split: str, dataset: DatasetYaml) -> list[str]:
    """The images in a folder, or listed in an image-list file."""
    if location.is_dir():
        return _folder_images(location)
    if not location.is_file():
        if dataset.relative_root:
            raise YoloslimError(
                f"split '{split}' of {dataset.file} points to {location}, which does not exist: path: "
                f"{dataset.relative_root} is relative, so it is read from the working directory or Ultralytics' "
                "datasets_dir; make path: absolute, or drop it to read the splits from the yaml's folder"
            )
        raise YoloslimError(
            f"split '{split}' of {dataset.file} points to {location}, which does not exist; correct {split}: "
            f"(relative paths start at {dataset.root})"
        )
    try:
        lines = [line.strip() for line in location.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise YoloslimError(
            f"split '{split}' of {dataset.file} points to {location}, which is neither an image folder nor an "
            f"image-list .txt file; correct {split}:"
        ) from None
    listed = [_listed_image(location, line) for line in lines if _is_image(line)]
    absent = [f for f in listed if not os.path.isfile(f)]
    if absent:
        raise YoloslimError(
            f"{location} (split '{split}' of {dataset.file}) lists {len(absent)} missing images, the first "
            f"{absent[0]}; correct the list (lines starting ./ are relative to its folder, other relative lines to the "
            "working directory)"
        )
    return listed


def _folder_images(folder: Path) -> list[str]:
    """Images in the folder and its subfolders, as Ultralytics' glob finds them: hidden files and folders left out."""
    found = []
    for parent, subfolders, names in os.walk(folder, followlinks=True):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found += [os.path.join(parent, name) for name in names if _is_image(name) and not name.startswith(".")]
    return found


def _listed_image(image_list: Path, line: str) -> str:
    """A line of an image-list file as Ultralytics reads it: ./ from the list's folder, else from the working
    directory."""
    return os.path.abspath(os.path.join(image_list.parent, line[2:]) if line.startswith("./") else line)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
