"""The RoI sampler of Fast R-CNN training (Girshick 2015, Sec. 2.3 "Mini-batch sampling").

For one training image with proposals P and ground-truth boxes G (the ground-truth boxes are
added to the proposals, as Fast R-CNN does):

- every RoI takes the ground-truth box of largest IoU (`boxes.iou_matrix`, +1 pixels);
- foreground: IoU >= fg_threshold (0.5); the RoI is labelled with that box's class;
- background: IoU in [bg_low, bg_high) = [0.1, 0.5); label 0;
- up to round(fg_fraction * num_rois) = 32 foreground RoIs are drawn without replacement, and
  background RoIs fill the rest of the num_rois = 128, again without replacement. An image
  short of either kind gives fewer RoIs, as in Fast R-CNN; RoIs with IoU < bg_low are never
  used.

Foreground RoIs get the normalised box targets of `boxes.encode` towards their ground truth;
background RoIs get zeros (they carry no box loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evaluation.voc.fast_rcnn import boxes as box_ops


@dataclass(frozen=True)
class RoiSample:
    """The RoIs of one image: boxes [R, 4], labels [R] (0 = background), targets [R, 4]
    (normalised, zero for background) and the IoU [R] with the assigned ground truth."""

    boxes: np.ndarray
    labels: np.ndarray
    targets: np.ndarray
    ious: np.ndarray

    @property
    def num_foreground(self) -> int:
        return int(np.sum(self.labels > 0))


def sample_rois(proposals, gt_boxes, gt_labels, rng: np.random.Generator,
                num_rois: int = 128, fg_fraction: float = 0.25, fg_threshold: float = 0.5,
                bg_low: float = 0.1, bg_high: float = 0.5, include_gt: bool = True,
                means=box_ops.BBOX_MEANS, stds=box_ops.BBOX_STDS) -> RoiSample:
    """Draw the training RoIs of one image.

    Args:
      proposals: [P, 4] inclusive boxes (P may be 0).
      gt_boxes: [G, 4] inclusive boxes (non-difficult objects).
      gt_labels: [G] classes in 1..K (0 is background).
      rng: the random generator of the draw.
      num_rois, fg_fraction, fg_threshold, bg_low, bg_high: as the module docstring says.
      include_gt: add the ground-truth boxes to the candidates.

    Returns:
      A RoiSample of R <= num_rois RoIs, foreground first. R is 0 when the image has no
      candidate in either range (for example no ground truth).
    """
    if not 0 <= bg_low <= bg_high <= fg_threshold <= 1:
        raise ValueError(f"need 0 <= bg_low <= bg_high <= fg_threshold <= 1; got {bg_low}, "
                         f"{bg_high}, {fg_threshold}")
    if num_rois < 1 or not 0 <= fg_fraction <= 1:
        raise ValueError(f"num_rois={num_rois} must be positive and fg_fraction={fg_fraction} "
                         "in [0, 1]")
    proposals = np.asarray(proposals, dtype=np.float64).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels, dtype=np.int64).reshape(-1)
    if gt_labels.size != gt_boxes.shape[0]:
        raise ValueError(f"{gt_boxes.shape[0]} ground-truth boxes but {gt_labels.size} labels")
    candidates = np.concatenate([gt_boxes, proposals]) if include_gt else proposals
    if gt_boxes.shape[0] == 0 or candidates.shape[0] == 0:
        empty = np.zeros((0, 4))
        return RoiSample(empty, np.zeros(0, np.int64), empty.astype(np.float32), np.zeros(0))
    ious = box_ops.iou_matrix(candidates, gt_boxes)
    nearest = np.argmax(ious, axis=1)
    best = ious[np.arange(len(candidates)), nearest]

    fg = np.flatnonzero(best >= fg_threshold)
    bg = np.flatnonzero((best >= bg_low) & (best < bg_high))
    num_fg = min(round(fg_fraction * num_rois), fg.size)
    fg = rng.choice(fg, num_fg, replace=False) if num_fg < fg.size else fg
    num_bg = min(num_rois - num_fg, bg.size)
    bg = rng.choice(bg, num_bg, replace=False) if num_bg < bg.size else bg
    keep = np.concatenate([fg, bg]).astype(np.int64)

    chosen = candidates[keep]
    labels = np.where(np.arange(keep.size) < fg.size, gt_labels[nearest[keep]], 0)
    targets = np.zeros((keep.size, 4), np.float32)
    if fg.size:
        targets[:fg.size] = box_ops.encode(chosen[:fg.size], gt_boxes[nearest[fg]], means, stds)
    return RoiSample(chosen, labels.astype(np.int64), targets, best[keep])
