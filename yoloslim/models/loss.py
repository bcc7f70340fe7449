"""The training loss of the original YOLOv5 repository's anchor-based detectors, written for yoloslim from the method.

Target assignment (assign_targets), per detection level:
- a label goes to every anchor whose width and height are both within a factor `anchor_t` (4) of the label's;
- besides the cell holding its centre, to the two neighbouring cells its centre is nearest to (the one left or right,
  the one above or below), when the centre is less than half a cell from that side and the neighbour is inside the
  map: the head predicts centres in (-0.5, 1.5) cells, so those neighbours can reach it.

Loss (ClassicLoss), summed over the levels: box, 1 - CIoU of the decoded box and the label, averaged over the
assigned (cell, anchor) pairs; objectness, binary cross-entropy of every cell and anchor against the detached,
non-negative CIoU of its assigned prediction (0 where none is assigned), weighted per level (balance); classes, binary
cross-entropy against one-hot labels of the assigned predictions (only with more than one class). Each part is
multiplied by its gain and the sum by the batch size.

The gains (LossGains) are those of the original's hyp.scratch-low.yaml with their scaling by classes, levels and image
size. Its other loss settings at their defaults (positive weights 1, no focal loss, no label smoothing) make the
cross-entropies plain ones, which is what is implemented here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

# Objectness weight per level, from the finest: three levels, or up to five (P3-P7).
_BALANCE = {3: (4.0, 1.0, 0.4)}
_BALANCE_ANY = (4.0, 1.0, 0.25, 0.06, 0.02)
# Cells a label is assigned to, as shifts (in cells) subtracted from its centre: its own, then the left, upper,
# right and lower neighbours.
_NEIGHBOURS = ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0), (0.0, -0.5))
_EPS = 1e-7


@dataclass(frozen=True)
class LossGains:
    """Loss gains and the anchor-matching threshold; the defaults are hyp.scratch-low.yaml's before scaling."""

    box: float = 0.05
    obj: float = 1.0
    cls: float = 0.5
    anchor_t: float = 4.0

    def scaled(self, nc: int, nl: int, imgsz: int) -> LossGains:
        """Gains for `nc` classes, `nl` detection levels and training images of side `imgsz`, scaled as the original
        scales them (its defaults are set for 80 classes, 3 levels and 640 px)."""
        levels = 3 / nl
        return LossGains(
            box=self.box * levels,
            obj=self.obj * (imgsz / 640) ** 2 * levels,
            cls=self.cls * nc / 80 * levels,
            anchor_t=self.anchor_t,
        )


@dataclass
class LevelTargets:
    """The (label, anchor, cell) pairs assigned on one level, one row each."""

    image: torch.Tensor  # image index in the batch
    anchor: torch.Tensor  # anchor index on the level
    gy: torch.Tensor  # cell row
    gx: torch.Tensor  # cell column
    box: torch.Tensor  # (n, 4): label centre relative to the cell's top-left corner, label size, in cells
    anchor_wh: torch.Tensor  # (n, 2): the anchor's size, in cells
    cls: torch.Tensor  # class index


def assign_targets(
    targets: torch.Tensor, anchors: torch.Tensor, shapes: list[tuple[int, int]], anchor_t: float = 4.0
) -> list[LevelTargets]:
    """Assign labels to predictions, per level.

    targets: (n, 6) rows of (image index, class, x, y, w, h), box normalised to 0..1 of the image. anchors:
    (levels, anchors, 2), in cells of each level (the Detect head's `anchors`). shapes: each level's map (ny, nx).
    Rows come out by neighbour (own cell first), then anchor, then label order.
    """
    return [_assign_level(targets, level_anchors, ny, nx, anchor_t) for level_anchors, (ny, nx) in zip(anchors, shapes)]


def _assign_level(targets: torch.Tensor, anchors: torch.Tensor, ny: int, nx: int, anchor_t: float) -> LevelTargets:
    grid = targets.new_tensor([1, 1, nx, ny, nx, ny])
    labels = targets * grid  # boxes in cells
    ratio = labels[None, :, 4:6] / anchors[:, None]  # (anchors, labels, 2)
    matched = torch.max(ratio, 1 / ratio).amax(2) < anchor_t
    anchor, label = matched.nonzero(as_tuple=True)
    labels = labels[label]

    xy = labels[:, 2:4]
    from_far_side = targets.new_tensor([nx, ny]) - xy
    near_low = (xy % 1 < 0.5) & (xy > 1)  # left, upper neighbour inside the map
    near_high = (from_far_side % 1 < 0.5) & (from_far_side > 1)  # right, lower
    own = torch.ones_like(near_low[:, 0])
    use = torch.stack((own, near_low[:, 0], near_low[:, 1], near_high[:, 0], near_high[:, 1]))  # (5, pairs)
    neighbour, pair = use.nonzero(as_tuple=True)

    xy = xy[pair]
    cell = (xy - targets.new_tensor(_NEIGHBOURS)[neighbour]).long()
    cell[:, 0].clamp_(0, nx - 1)
    cell[:, 1].clamp_(0, ny - 1)
    return LevelTargets(
        image=labels[pair, 0].long(),
        anchor=anchor[pair],
        gy=cell[:, 1],
        gx=cell[:, 0],
        box=torch.cat((xy - cell, labels[pair, 4:6]), 1),
        anchor_wh=anchors[anchor[pair]],
        cls=labels[pair, 1].long(),
    )


def complete_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """CIoU (Zheng et al. 2020) of boxes a and b, row by row, both (n, 4) as centre x, centre y, width, height:
    IoU minus the squared centre distance over the enclosing box's squared diagonal, minus the aspect-ratio term."""
    a_min, a_max = a[:, :2] - a[:, 2:] / 2, a[:, :2] + a[:, 2:] / 2
    b_min, b_max = b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2
    overlap = (torch.min(a_max, b_max) - torch.max(a_min, b_min)).clamp(0).prod(1)
    union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - overlap + _EPS
    iou = overlap / union
    enclosing = torch.max(a_max, b_max) - torch.min(a_min, b_min)
    diagonal = enclosing.square().sum(1) + _EPS
    distance = (b[:, :2] - a[:, :2]).square().sum(1)
    aspect = (4 / math.pi**2) * (torch.atan(b[:, 2] / b[:, 3]) - torch.atan(a[:, 2] / a[:, 3])).square()
    with torch.no_grad():
        weight = aspect / (aspect - iou + 1 + _EPS)
    return iou - (distance / diagonal + aspect * weight)


class ClassicLoss:
    """The original's detection loss for a classic Detect head; call with its raw maps and the labels."""

    def __init__(self, head: nn.Module, gains: LossGains):
        self.anchors = head.anchors  # (levels, anchors, 2), in cells
        self.nc = head.nc
        self.gains = gains
        self.balance = _BALANCE.get(head.nl, _BALANCE_ANY)[: head.nl]

    def __call__(self, raw: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """raw: the head's training output, each (batch, anchors, ny, nx, 5 + classes); targets: (n, 6) as for
        assign_targets. Returns (the loss to minimise, times the batch size; detached (box, obj, cls))."""
        shapes = [tuple(level.shape[2:4]) for level in raw]
        assigned = assign_targets(targets, self.anchors.to(targets.device), shapes, self.gains.anchor_t)
        box = obj = cls = raw[0].new_zeros(())
        for level, found, weight in zip(raw, assigned, self.balance):
            objectness = torch.zeros_like(level[..., 4])
            if len(found.image):
                pred = level[found.image, found.anchor, found.gy, found.gx]
                iou = complete_iou(decode_boxes(pred, found.anchor_wh), found.box)
                box = box + (1 - iou).mean()
                objectness[found.image, found.anchor, found.gy, found.gx] = iou.detach().clamp(0).to(level.dtype)
                if self.nc > 1:
                    labels = F.one_hot(found.cls, self.nc).to(pred.dtype)
                    cls = cls + F.binary_cross_entropy_with_logits(pred[:, 5:], labels)
            obj = obj + F.binary_cross_entropy_with_logits(level[..., 4], objectness) * weight
        parts = torch.stack((box * self.gains.box, obj * self.gains.obj, cls * self.gains.cls))
        return parts.sum() * raw[0].shape[0], parts.detach()


def decode_boxes(pred: torch.Tensor, anchor_wh: torch.Tensor) -> torch.Tensor:
    """Boxes of raw predictions (n, 5 + classes) in cells, centre relative to the cell's top-left corner, as the
    Detect head decodes them: centre offset in (-0.5, 1.5), size in (0, 4) anchors."""
    xy = pred[:, :2].sigmoid() * 2 - 0.5
    wh = (pred[:, 2:4].sigmoid() * 2) ** 2 * anchor_wh
    return torch.cat((xy, wh), 1)
