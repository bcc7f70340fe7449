import dataclasses
import hashlib

import numpy as np
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
    assert len(spec["names"]) >= 6
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
