import dataclasses
import hashlib

import numpy as np
import pytest
import yaml

from yoloslim.data import resolve_data
from yoloslim.data.synthetic import default_config, ensure_synthetic_dataset, render_image
from yoloslim.utils.errors import YoloslimError


def folder_digest(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in {".jpg", ".txt"}):
        digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def test_generation_is_deterministic(tmp_path):
    config = dataclasses.replace(default_config(), splits={"train": 3, "val": 2})
    a = ensure_synthetic_dataset(config, root=tmp_path / "a")
    b = ensure_synthetic_dataset(config, root=tmp_path / "b")
    assert folder_digest(a.parent) == folder_digest(b.parent)
    other = ensure_synthetic_dataset(dataclasses.replace(config, seed=1), root=tmp_path / "c")
    assert folder_digest(other.parent) != folder_digest(a.parent)


def test_data_yaml_is_complete(tmp_path):
    config = dataclasses.replace(default_config(), splits={"train": 2, "val": 1})
    spec = yaml.safe_load(ensure_synthetic_dataset(config, root=tmp_path).read_text())
    assert list(spec["names"].values()) == list(config.classes)
    assert sorted(p.name for p in (tmp_path.glob("*/images/val/*"))) == ["val_00000.jpg"]


def test_objects_span_the_configured_sizes_and_stay_in_the_image():
    config = default_config()
    extents, counts = [], set()
    for i in range(60):
        image, labels = render_image(config, np.random.default_rng([7, i]))
        assert image.shape == (config.image_size, config.image_size, 3) and image.dtype == np.uint8
        counts.add(len(labels))
        for cls, x, y, w, h in labels:
            assert 0 <= cls < len(config.classes)
            assert 0 <= x - w / 2 and x + w / 2 <= 1 and 0 <= y - h / 2 and y + h / 2 <= 1
            extents.append(max(w, h) * config.image_size)
    assert min(extents) < 16 and max(extents) > 100, "objects must range from small to large"
    assert len(counts) > 3


def test_leaving_data_out_uses_the_embedded_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLOSLIM_CACHE", str(tmp_path))
    monkeypatch.setattr(
        "yoloslim.data.synthetic.default_config",
        lambda: dataclasses.replace(default_config(), splits={"train": 1, "val": 1}),
    )
    assert resolve_data(None).is_relative_to(tmp_path)


def test_missing_data_yaml_is_refused(tmp_path):
    try:
        resolve_data(tmp_path / "missing.yaml")
    except YoloslimError as e:
        assert "does not exist" in str(e)
    else:
        raise AssertionError("a missing dataset yaml must be refused")


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from yoloslim.utils.files import write_text_atomic

    mask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "out.txt", "x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == 0o644


def test_a_cache_folder_finished_by_another_process_first_is_kept(tmp_path):
    from yoloslim.utils.files import atomic_dir

    target = tmp_path / "cache-entry"
    with atomic_dir(target) as mine:
        (mine / "data.yaml").write_text("mine")
        with atomic_dir(target) as theirs:  # a second process that finishes first
            (theirs / "data.yaml").write_text("theirs")
    assert (target / "data.yaml").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["cache-entry"]  # no temporary folder left behind


def test_an_incomplete_cache_folder_in_the_way_is_named(tmp_path):
    config = dataclasses.replace(default_config(), splits={"train": 1, "val": 1})
    (tmp_path / f"synthetic-{config.cache_key()}" / "images").mkdir(parents=True)
    try:
        ensure_synthetic_dataset(config, root=tmp_path)
    except YoloslimError as e:
        assert "incomplete dataset folder; delete it" in str(e)
    else:
        raise AssertionError("an incomplete folder must not pass for the dataset")


# -- Ultralytics' dataset format --------------------------------------------------------------------------------------

SPLITS = {
    "train": {"t0": "0 0.5 0.5 0.2 0.2\n", "t1": "1 0.3 0.3 0.1 0.1\n"},
    "val": {"v0": "1 0.5 0.5 0.4 0.4\n"},
}


def write_dataset(root, splits=None, names=("a", "b"), yaml_text=None):
    """A tiny YOLO dataset under root: splits maps split -> {image stem: its label text, or None for no label file}."""
    import cv2

    for split, images in (SPLITS if splits is None else splits).items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        for stem, label in images.items():
            cv2.imwrite(str(root / "images" / split / f"{stem}.jpg"), np.full((8, 8, 3), 127, np.uint8))
            if label is not None:
                (root / "labels" / split).mkdir(parents=True, exist_ok=True)
                (root / "labels" / split / f"{stem}.txt").write_text(label)
    data = root / "data.yaml"
    spec = {"train": "images/train", "val": "images/val", "names": list(names)}
    data.write_text(yaml.safe_dump(spec) if yaml_text is None else yaml_text)
    return data


def test_a_split_folder_is_listed_with_its_subfolders_and_without_hidden_files(tmp_path):
    from yoloslim.data import split_images

    data = write_dataset(tmp_path, {"train": {"t0": "0 0.5 0.5 0.2 0.2\n"}, "val": {"v0": "1 0.5 0.5 0.4 0.4\n"}})
    (tmp_path / "images" / "train" / "sub").mkdir()
    for name in ("sub/t1.PNG", ".hidden.jpg", "notes.md"):
        (tmp_path / "images" / "train" / name).write_bytes(b"")
    images, names = split_images(data, "train")
    assert [p.relative_to(tmp_path).as_posix() for p in images] == ["images/train/sub/t1.PNG", "images/train/t0.jpg"]
    assert names == {0: "a", 1: "b"}


def test_splits_resolve_from_path_else_from_the_yaml_folder_as_in_ultralytics(tmp_path, monkeypatch):
    from yoloslim.data import split_images

    write_dataset(tmp_path / "set")
    elsewhere = tmp_path / "yamls" / "data.yaml"
    elsewhere.parent.mkdir()
    spec = {"train": "images/train", "val": "images/val", "names": ["a", "b"]}
    elsewhere.write_text(yaml.safe_dump({"path": str(tmp_path / "set"), **spec}))
    assert len(split_images(elsewhere, "train")[0]) == 2
    monkeypatch.chdir(tmp_path)  # a relative path: is taken from the working directory
    elsewhere.write_text(yaml.safe_dump({"path": "set", **spec}))
    assert split_images(elsewhere, "val")[0] == [tmp_path / "set" / "images" / "val" / "v0.jpg"]
    # a Roboflow export: its yaml lies in the root but names the splits ../train/images, which Ultralytics retries
    # without the ../
    roboflow = tmp_path / "set" / "roboflow.yaml"
    roboflow.write_text(yaml.safe_dump({"train": "../images/train", "val": "../images/val", "names": ["a", "b"]}))
    assert len(split_images(roboflow, "train")[0]) == 2


def test_image_list_files_resolve_dot_lines_from_their_folder(tmp_path):
    from yoloslim.data import resolve_data, split_images

    data = write_dataset(tmp_path)
    (tmp_path / "train.txt").write_text(f"./images/train/t0.jpg\n{tmp_path / 'images' / 'train' / 't1.jpg'}\n\n")
    data.write_text(yaml.safe_dump({"train": "train.txt", "val": ["images/val"], "names": ["a", "b"]}))
    assert resolve_data(data) == data
    assert split_images(data, "train")[0] == [tmp_path / "images" / "train" / n for n in ("t0.jpg", "t1.jpg")]


def test_usable_labels_pass_the_check(tmp_path):
    """Polygons, a byte-order mark, blank lines, background images without a label file, 1% past the edge, nc alone."""
    from yoloslim.data import resolve_data

    splits = {
        "train": {
            "poly": "\ufeff1 0.1 0.2 0.3 0.2 0.3 0.6 0.1 0.6\n\n",
            "edge": "0 1.005 0.5 0.2 0.2\n",
            "background": None,
            "empty": "",
        },
        "val": {"v0": "0 0.5 0.5 0.4 0.4"},
    }
    data = write_dataset(tmp_path, splits, yaml_text="train: images/train\nval: images/val\nnc: 2\n")
    assert resolve_data(data) == data


def test_the_check_reads_each_label_file_once(tmp_path, monkeypatch):
    import builtins

    from yoloslim.data import check

    data = write_dataset(tmp_path)
    opened = []

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(check, "open", counting_open, raising=False)
    check.check_dataset(data)
    labels = sorted(str(p) for p in (tmp_path / "labels").rglob("*.txt"))
    assert sorted(opened) == labels


def test_labels_are_found_where_ultralytics_looks(tmp_path):
    from yoloslim.data import label_path, read_labels

    nested = tmp_path / "set" / "images" / "val" / "a.jpg"
    assert label_path(nested) == tmp_path / "set" / "labels" / "val" / "a.txt"
    twice = tmp_path / "images" / "set" / "images" / "a.png"
    assert label_path(twice) == tmp_path / "images" / "set" / "labels" / "a.txt"
    beside = tmp_path / "flat" / "b.jpg"
    assert label_path(beside) == tmp_path / "flat" / "b.txt"
    beside.parent.mkdir()
    beside.with_suffix(".txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.1 0.2 0.3 0.2 0.3 0.6 0.1 0.6\n")
    boxes, classes = read_labels(beside, (100, 200))
    np.testing.assert_allclose(boxes, [[80, 30, 120, 70], [20, 20, 60, 60]])
    assert classes.tolist() == [0, 1]
    beside.with_suffix(".txt").write_text("0 0.5 0.5 0.2\n")
    with pytest.raises(YoloslimError, match="b.txt: cannot read the label line '0 0.5 0.5 0.2'"):
        read_labels(beside, (100, 200))


def test_image_suffixes_are_ultralytics_own():
    from ultralytics.data.utils import IMG_FORMATS

    from yoloslim.data.dataset import IMAGE_SUFFIXES

    assert IMAGE_SUFFIXES == {f".{suffix}" for suffix in IMG_FORMATS}


def test_ultralytics_spellings_of_val_and_nc_are_read(tmp_path):
    from yoloslim.data import resolve_data, split_images

    data = write_dataset(tmp_path, yaml_text="train: images/train\nvalidation: images/val\nnc: '2'\n")
    assert resolve_data(data) == data and len(split_images(data, "val")[0]) == 1


def test_an_upper_case_yaml_suffix_is_read(tmp_path):
    from yoloslim.data import resolve_data

    data = write_dataset(tmp_path).rename(tmp_path / "data.YAML")
    assert resolve_data(data) == data


def test_a_relative_path_key_that_leads_nowhere_names_itself(tmp_path, monkeypatch):
    from yoloslim.data import resolve_data

    spec = "path: ../elsewhere\ntrain: images/train\nval: images/val\nnc: 2\n"
    data = write_dataset(tmp_path / "set", yaml_text=spec)
    monkeypatch.chdir(tmp_path / "set")
    with pytest.raises(YoloslimError, match="path: ../elsewhere is relative"):
        resolve_data(data)
