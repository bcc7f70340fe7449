import numpy as np
import pytest
from conftest import SHARED

from yoloslim.evaluate import (
    IOU_THRESHOLDS,
    average_precision,
    evaluate,
    label_path,
    match_image,
    mean_ap,
    read_labels,
    split_images,
    summarise,
)
from yoloslim.runtime.postprocess import Detections
from yoloslim.utils.errors import YoloslimError

LICENSE_PLATE = SHARED / "data" / "license_plate" / "data.yaml"
COCO128 = SHARED / "data" / "coco128" / "data.yaml"
USER_WEIGHTS = SHARED / "weights" / "license_plate_yolov5nu.pt"
needs_shared = pytest.mark.skipif(not LICENSE_PLATE.exists(), reason="../shared is not beside the project")


def test_hand_worked_average_precision():
    """One class, 3 ground truths; detections by score: hit, miss, hit, miss.

    recall    1/3, 1/3, 2/3, 2/3      precision 1, 1/2, 2/3, 1/2  -> made monotone: 1, 2/3, 2/3, 1/2
    101 recall points: 0.00..0.33 (34 points) read 1; 0.34..0.66 (33 points) read 2/3; 0.67..1.00 read 0.
    AP = (34 * 1 + 33 * 2/3) / 101 = 56 / 101
    """
    tp = np.array([[1], [0], [1], [0]], dtype=bool)
    assert average_precision(tp, n_gt=3)[0] == pytest.approx(56 / 101)
    assert average_precision(np.ones((2, 1), bool), n_gt=2)[0] == pytest.approx(1.0)
    assert average_precision(np.zeros((2, 1), bool), n_gt=2)[0] == 0.0


def test_matching_is_greedy_by_score_and_per_threshold():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    det = Detections(
        boxes=np.array([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 27.5]], float),
        scores=np.array([0.9, 0.8, 0.7]),
        classes=np.array([0, 0, 0]),
    )
    record = match_image(det, gt, np.array([0, 0]))
    assert record.tp[0].all()  # exact box: a hit at every threshold
    assert not record.tp[1].any()  # the same ground truth is already taken
    hits = record.tp[2]  # IoU 0.75 with the second box
    assert hits[IOU_THRESHOLDS <= 0.75 + 1e-9].all() and not hits[IOU_THRESHOLDS > 0.75 + 1e-9].any()
    # the wrong class never matches
    other = match_image(Detections(det.boxes[:1], det.scores[:1], np.array([1])), gt, np.array([0, 0]))
    assert not other.tp.any()


@needs_shared
def test_evaluator_on_real_coco128_annotations():
    """80 classes of real annotations: perfect detections score 1, jittered ones less, and intervals bracket the mean."""
    import cv2

    images, names = split_images(COCO128, "val")
    assert len(images) == 128 and len(names) == 80
    rng = np.random.default_rng(0)
    perfect, jittered = [], []
    for path in images:
        h, w = cv2.imread(str(path)).shape[:2]
        boxes, classes = read_labels(path, (h, w))
        scores = rng.uniform(0.3, 1.0, len(classes))
        perfect.append(match_image(Detections(boxes, scores, classes), boxes, classes))
        size = np.maximum(boxes[:, 2:] - boxes[:, :2], 1)
        noisy = boxes + rng.normal(0, 0.08, boxes.shape) * np.tile(size, 2)
        jittered.append(match_image(Detections(noisy, scores, classes), boxes, classes))
    assert mean_ap(perfect, 80) == pytest.approx((1.0, 1.0))
    result = summarise(jittered, names, bootstrap=200)
    assert result.instances == 929 and result.images == 128
    assert 0.9 < result.map50 <= 1.0 and 0.2 < result.map < 0.9
    low, high = result.ci95["map"]
    assert low < result.map < high and high - low < 0.2
    assert len(result.per_class_ap) == len({int(c) for r in jittered for c in r.gt_classes})


@needs_shared
def test_agrees_with_ultralytics_val_on_a_real_model(tmp_path):
    from ultralytics import YOLO

    ours = evaluate(USER_WEIGHTS, LICENSE_PLATE, imgsz=320, bootstrap=200)
    theirs = YOLO(str(USER_WEIGHTS)).val(
        data=str(LICENSE_PLATE), imgsz=320, batch=8, plots=False, verbose=False, project=str(tmp_path), name="v"
    )
    assert abs(ours.map50 - theirs.box.map50) < 0.01
    assert abs(ours.map - theirs.box.map) < 0.01
    assert ours.ci95["map"][0] < ours.map < ours.ci95["map"][1]


def test_labels_in_each_layout_ultralytics_reads(tmp_path):
    nested = tmp_path / "set" / "images" / "val" / "a.jpg"
    assert label_path(nested) == tmp_path / "set" / "labels" / "val" / "a.txt"
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
