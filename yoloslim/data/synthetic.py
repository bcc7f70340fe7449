"""The embedded demo dataset: deterministic synthetic detection images in YOLO format.

Class identity is carried by shape alone (colour and texture are random), objects range from a few pixels to half the
image, later objects occlude earlier ones, and distractor shapes, textured noisy backgrounds and uneven lighting keep a
nano model from saturating it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml

from yoloslim.utils.assets import cache_dir, shipped_file
from yoloslim.utils.errors import YoloslimError
from yoloslim.utils.files import atomic_dir

GENERATOR_VERSION = 1  # bump when the drawing code changes, so caches regenerate


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    image_size: int = 320
    splits: dict = field(default_factory=lambda: {"train": 600, "val": 150})
    classes: tuple = ("circle", "square", "triangle", "star", "cross", "hexagon")
    object_size: tuple = (8, 160)
    objects_per_image: tuple = (1, 9)
    distractors_per_image: tuple = (3, 12)
    min_visible_fraction: float = 0.45
    noise_sigma: tuple = (2.0, 12.0)

    def __post_init__(self):
        if not 0 < self.object_size[0] <= self.object_size[1] <= self.image_size:
            raise YoloslimError(
                f"object_size {self.object_size} must be increasing and fit image_size {self.image_size}"
            )
        if not self.classes:
            raise YoloslimError("the synthetic dataset needs at least one class")

    @classmethod
    def from_yaml(cls, path: str | Path) -> SyntheticConfig:
        raw = yaml.safe_load(Path(path).read_text())
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})

    def cache_key(self) -> str:
        blob = json.dumps({"v": GENERATOR_VERSION, **asdict(self)}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_config() -> SyntheticConfig:
    return SyntheticConfig.from_yaml(shipped_file("data", "synthetic.yaml"))


def ensure_synthetic_dataset(config: SyntheticConfig | None = None, root: Path | None = None) -> Path:
    """Return the data.yaml of the generated dataset, generating it on first use."""
    config = config or default_config()
    target = (root or cache_dir() / "datasets") / f"synthetic-{config.cache_key()}"
    if not (target / "data.yaml").is_file():
        with atomic_dir(target) as tmp:
            write_dataset(config, tmp)
            _write_data_yaml(config, tmp, final_root=target)
        if not (target / "data.yaml").is_file():  # a folder left by something else was in the way
            raise YoloslimError(f"{target} is an incomplete dataset folder; delete it and run again")
    return target / "data.yaml"


def _write_data_yaml(config: SyntheticConfig, folder: Path, final_root: Path) -> None:
    spec = {
        "path": str(final_root),
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(config.classes)),
        "generator": {"version": GENERATOR_VERSION, **json.loads(json.dumps(asdict(config)))},
    }
    (folder / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def write_dataset(config: SyntheticConfig, folder: Path) -> None:
    """Write every split's images and labels under `folder`; the same config always gives the same files."""
    for split_index, (split, count) in enumerate(config.splits.items()):
        (folder / "images" / split).mkdir(parents=True)
        (folder / "labels" / split).mkdir(parents=True)
        for i in range(count):
            rng = np.random.default_rng([config.seed, split_index, i])
            image, labels = render_image(config, rng)
            name = f"{split}_{i:05d}"
            cv2.imwrite(str(folder / "images" / split / f"{name}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
            lines = [f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}" for c, x, y, w, h in labels]
            (folder / "labels" / split / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))


def render_image(config: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple]]:
    """Draw one image; return it (BGR uint8) and its YOLO labels (class, cx, cy, w, h normalised)."""
    size = config.image_size
    image = _background(size, rng)
    masks = [
        (None, _distractor_mask(size, rng)) for _ in range(rng.integers(*config.distractors_per_image, endpoint=True))
    ]
    masks += [_object_mask(config, rng) for _ in range(rng.integers(*config.objects_per_image, endpoint=True))]
    order = rng.permutation(len(masks))  # painting order decides who occludes whom
    masks = [masks[i] for i in order]
    drawn = _drop_hidden_objects(masks, config.min_visible_fraction)
    owner = np.full((size, size), -1, np.int32)
    for index, (_, mask) in enumerate(drawn):
        image = _paint(image, mask, rng)
        owner[mask] = index
    labels = []
    for index, (cls, _) in enumerate(drawn):
        if cls is None:
            continue
        ys, xs = np.nonzero(owner == index)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        labels.append((cls, (x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size))
    return _lighting_and_noise(image, config, rng), labels


def _drop_hidden_objects(masks: list, min_visible: float) -> list:
    """Keep distractors, and objects whose visible part after all later paints is large enough to label."""
    kept = list(masks)
    changed = True
    while changed:  # dropping one object can reveal another, so repeat until stable
        changed = False
        covered = np.zeros_like(kept[0][1]) if kept else None
        visible = [0.0] * len(kept)
        for index in range(len(kept) - 1, -1, -1):
            mask = kept[index][1]
            area = mask.sum()
            visible[index] = (mask & ~covered).sum() / area if area else 0.0
            covered |= mask
        for index in range(len(kept)):
            if kept[index][0] is not None and visible[index] < min_visible:
                del kept[index]
                changed = True
                break
    return kept


def _object_mask(config: SyntheticConfig, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    size = config.image_size
    cls = int(rng.integers(len(config.classes)))
    lo, hi = config.object_size
    extent = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    center = rng.uniform(extent / 3, size - extent / 3, 2)
    angle = rng.uniform(0, 2 * np.pi)
    aspect = rng.uniform(0.75, 1.3)
    mask = np.zeros((size, size), np.uint8)
    shape = config.classes[cls]
    radius = extent / 2
    if shape == "circle":
        axes = (max(1, int(radius * aspect)), max(1, int(radius / aspect)))
        cv2.ellipse(mask, tuple(int(v) for v in center), axes, np.degrees(angle), 0, 360, 1, -1)
    elif shape == "cross":
        arm = max(1.0, radius * 0.3)
        for theta in (angle, angle + np.pi / 2):
            direction = np.array([np.cos(theta), np.sin(theta)])
            normal = np.array([-direction[1], direction[0]])
            corners = [
                center + s * radius * direction + t * arm * normal for s, t in ((-1, -1), (1, -1), (1, 1), (-1, 1))
            ]
            cv2.fillPoly(mask, [np.round(corners).astype(np.int32)], 1)
    else:
        cv2.fillPoly(mask, [_polygon(shape, center, radius, angle, aspect)], 1)
    return cls, mask.astype(bool)


def _polygon(shape: str, center: np.ndarray, radius: float, angle: float, aspect: float) -> np.ndarray:
    if shape == "star":
        k = np.arange(10)
        r = np.where(k % 2 == 0, radius, radius * 0.45)
        theta = angle + k * np.pi / 5
    else:
        sides = {"square": 4, "triangle": 3, "hexagon": 6}[shape]
        theta = angle + np.arange(sides) * 2 * np.pi / sides
        r = np.full(sides, radius)
    points = np.stack([r * np.cos(theta) * aspect, r * np.sin(theta) / aspect], 1) + center
    return np.round(points).astype(np.int32)


def _distractor_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """Clutter that is none of the classes: thick lines, irregular blobs and thin rings."""
    mask = np.zeros((size, size), np.uint8)
    kind = rng.integers(3)
    if kind == 0:
        p0, p1 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        cv2.line(mask, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 1, int(rng.integers(2, 9)))
    elif kind == 1:
        center = rng.uniform(0, size, 2)
        n = int(rng.integers(5, 9))
        theta = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = rng.uniform(5, size / 6, n)
        points = np.stack([r * np.cos(theta), r * np.sin(theta)], 1) + center
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    else:
        center = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.circle(mask, center, int(rng.integers(10, size // 4)), 1, int(rng.integers(1, 4)))
    return mask.astype(bool)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency colour noise plus a random texture (stripes or checks)."""
    coarse = rng.uniform(40, 215, (int(rng.integers(2, 7)),) * 2 + (3,)).astype(np.float32)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(4, 40)
    theta = rng.uniform(0, np.pi)
    phase = (xx * np.cos(theta) + yy * np.sin(theta)) / period
    texture = (
        np.sin(2 * np.pi * phase)
        if rng.random() < 0.5
        else np.sign(np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period))
    )
    image += texture[..., None] * rng.uniform(0, 30)
    return np.clip(image, 0, 255)


def _paint(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    fill = np.broadcast_to(colour, image.shape).copy()
    if rng.random() < 0.5:  # textured fill, so colour edges alone do not give shapes away
        fill += rng.normal(0, rng.uniform(5, 35), image.shape[:2])[..., None]
    image[mask] = fill[mask]
    return image


def _lighting_and_noise(image: np.ndarray, config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    size = config.image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    gx, gy = rng.uniform(-0.6, 0.6, 2)
    gain = rng.uniform(0.6, 1.3) * (1 + gx * (xx - 0.5) + gy * (yy - 0.5))
    image = image * gain[..., None]
    image = 255 * (np.clip(image, 0, 255) / 255) ** rng.uniform(0.7, 1.4)
    image += rng.normal(0, rng.uniform(*config.noise_sigma), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)
