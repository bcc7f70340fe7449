import math

import numpy as np
import pytest

from yoloslim.data import label_path, read_labels, split_images
from yoloslim.evaluate import (
    IOU_THRESHOLDS,
    average_precision,
    bootstrap_ci,
    evaluate,
    match_image,
    mean_ap,
    summarise,
)
from yoloslim.runtime.postprocess import Detections


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


def test_evaluator_on_generated_annotations(synthetic_data):
    """Perfect detections on every label of the dataset score 1; jittered ones less, and more so at strict IoU."""
    import cv2

    images, names = split_images(synthetic_data, "val")
    labels = [label_path(path).read_text().splitlines() for path in images]
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
    assert mean_ap(perfect, len(names)) == pytest.approx((1.0, 1.0))
    result = summarise(jittered, names, bootstrap=0)
    assert result.images == len(images) and result.instances == sum(len(lines) for lines in labels)
    assert 0.9 < result.map50 <= 1.0 and 0.2 < result.map < 0.9
    present = {names[int(line.split()[0])] for lines in labels for line in lines}
    assert set(result.per_class_ap) == present


def _binomial_quantile(n: int, p: float, q: float) -> int:
    """Smallest x with P(X <= x) >= q for X ~ Binomial(n, p)."""
    cumulative = 0.0
    for x in range(n + 1):
        cumulative += math.comb(n, x) * p**x * (1 - p) ** (n - x)
        if cumulative >= q:
            return x
    return n


def test_bootstrap_interval_of_a_binomial_case():
    """n images with one object each; k are found (IoU 0.77, the only detection), the rest missed. Precision is 1, so
    AP50 is the share of the 101 recall points at or below the recall X/n, and AP50-95 0.6 of it (IoU 0.77 passes 6
    of the 10 thresholds). Resampling the images draws X ~ Binomial(n, k/n): the interval's ends are AP50 at its
    2.5% and 97.5% quantiles, to within one recall point of sampling and interpolation."""
    n, k = 99, 60  # X/n never equals a recall point j/100 for 0 < X < n, so no rounding tie
    gt, hit = np.array([[0, 0, 100, 100]], float), np.array([[0, 0, 100, 77]], float)
    found = match_image(Detections(hit, np.array([0.9]), np.array([0])), gt, np.array([0]))
    missed = match_image(Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)), gt, np.array([0]))
    records = [found] * k + [missed] * (n - k)

    def ap50(x: int) -> float:
        return (math.floor(100 * x / n) + 1) / 101

    assert mean_ap(records, 1) == pytest.approx((ap50(k), 0.6 * ap50(k)))
    interval = bootstrap_ci(records, 1, samples=2000)
    expected = [ap50(_binomial_quantile(n, k / n, q)) for q in (0.025, 0.975)]
    np.testing.assert_allclose(interval["map50"], expected, atol=1 / 101 + 1e-9)
    np.testing.assert_allclose(interval["map"], 0.6 * np.array(interval["map50"]), rtol=1e-9)
    assert expected[1] - expected[0] > 10 / 101  # the case is wide enough to tell a wrong interval


@pytest.mark.slow
def test_agrees_with_ultralytics_val_on_the_shipped_model(shipped_weights, synthetic_data, tmp_path):
    from ultralytics import YOLO

    ours = evaluate(shipped_weights, synthetic_data, imgsz=320, bootstrap=0)
    theirs = YOLO(str(shipped_weights)).val(
        data=str(synthetic_data), imgsz=320, batch=8, plots=False, verbose=False, project=str(tmp_path), name="v"
    )
    assert ours.map > 0.3  # a trained model on the images it was measured on: the comparison has detections to match
    assert abs(ours.map50 - theirs.box.map50) < 0.01
    assert abs(ours.map - theirs.box.map) < 0.01
