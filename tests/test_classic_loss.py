"""yoloslim's classic YOLOv5 loss and target assignment against the original repository's own code, through the
fixtures tools/make_classic_loss_fixtures.py made with v7.0's ComputeLoss (docs/classic-yolov5.md). Each fixture holds
a batch's labels, the raw maps of a committed classic checkpoint and what the original computed from them."""

from pathlib import Path

import numpy as np
import pytest
import torch

from yoloslim.models import load_classic_checkpoint
from yoloslim.models.loss import ClassicLoss, LossGains, assign_targets, complete_iou

FIXTURES = Path(__file__).parent / "fixtures" / "classic"
CASES = {"edges": "v7.0-best", "random": "v7.0-best", "empty": "v7.0-best", "two-levels": "v6.0-best"}


def fixture(case: str) -> dict:
    with np.load(FIXTURES / f"loss-{case}.npz") as loaded:
        return {key: torch.from_numpy(value) for key, value in loaded.items()}


def head_of(case: str):
    model, _ = load_classic_checkpoint(FIXTURES / f"{CASES[case]}.pt")
    return model.model[-1]


def raw_maps(expected: dict, head) -> list[torch.Tensor]:
    return [expected[f"raw{i}"].clone().requires_grad_() for i in range(head.nl)]


def gains_for(expected: dict, head) -> LossGains:
    return LossGains().scaled(nc=head.nc, nl=head.nl, imgsz=int(expected["imgsz"]))


@pytest.mark.parametrize("case", CASES)
def test_gains_scale_with_classes_levels_and_image_size_as_the_original(case):
    expected, head = fixture(case), head_of(case)
    gains = gains_for(expected, head)
    found = [gains.box, gains.obj, gains.cls, gains.anchor_t]
    np.testing.assert_allclose(found, expected["gains"].numpy(), rtol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_assigned_targets_equal_the_originals(case):
    expected, head = fixture(case), head_of(case)
    shapes = [tuple(expected[f"raw{i}"].shape[2:4]) for i in range(head.nl)]
    levels = assign_targets(expected["targets"], head.anchors, shapes, anchor_t=4.0)
    assert len(levels) == head.nl
    for i, found in enumerate(levels):
        # same rows in the same order: the order decides which label a cell keeps when two share it
        indices = torch.stack((found.image, found.anchor, found.gy, found.gx, found.cls))
        torch.testing.assert_close(indices, expected[f"assigned{i}"], rtol=0, atol=0)
        torch.testing.assert_close(found.box, expected[f"box{i}"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(found.anchor_wh, expected[f"anchor_wh{i}"], rtol=0, atol=0)


def test_the_edge_cases_are_in_the_fixture():
    """The labels the assignment rules single out really occur: neighbour cells, unmatched labels, clamped cells."""
    expected, head = fixture("edges"), head_of("edges")
    targets = expected["targets"]
    assigned = [expected[f"assigned{i}"] for i in range(head.nl)]
    boxes = [expected[f"box{i}"] for i in range(head.nl)]
    centres = torch.cat(boxes)[:, :2]
    assert ((centres < 0) | (centres >= 1)).any()  # a neighbour cell's offset lies outside its own cell
    assert (centres == 1).any()  # the clamped bottom-right corner
    images_with_labels = set(targets[:, 0].long().tolist())
    assert set(torch.cat([a[0] for a in assigned]).tolist()) == images_with_labels
    cells = torch.cat([a[:4] for a in assigned[:1]], 0).T.tolist()
    assert len(cells) > len({tuple(c) for c in cells})  # two labels on one cell and anchor
    assert len(targets) * 3 * 3 > sum(len(a[0]) for a in assigned)  # some label matches no anchor


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradient_equal_the_originals(case):
    expected, head = fixture(case), head_of(case)
    raw = raw_maps(expected, head)
    loss, parts = ClassicLoss(head, gains_for(expected, head))(raw, expected["targets"])
    loss.backward()
    torch.testing.assert_close(parts, expected["parts"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(loss.view(1), expected["loss"], rtol=1e-5, atol=1e-8)
    for i, level in enumerate(raw):
        scale = expected[f"grad{i}"].abs().max().item()
        torch.testing.assert_close(level.grad, expected[f"grad{i}"], rtol=1e-4, atol=1e-5 * scale)


def test_complete_iou_of_equal_boxes_is_one_and_falls_with_distance():
    box = torch.tensor([[2.0, 3.0, 1.5, 0.5]])
    assert complete_iou(box, box).item() == pytest.approx(1.0, abs=1e-6)
    apart = box + torch.tensor([[3.0, 0.0, 0.0, 0.0]])  # no overlap: minus the centre-distance term only
    assert complete_iou(box, apart).item() == pytest.approx(-(3.0**2) / (4.5**2 + 0.5**2), rel=1e-5)
