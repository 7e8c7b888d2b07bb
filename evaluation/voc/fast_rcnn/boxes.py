"""Boxes in the devkit's convention, Fast R-CNN box targets, and non-maximum suppression.

Every box here is (x1, y1, x2, y2) in inclusive pixel coordinates (the VOC devkit's, 1-based
for ground truth and proposals): a box covers x2 - x1 + 1 pixels in x. Width, height and IoU
use that +1, as the devkit and Fast R-CNN do; the IoU is the devkit's own
(`evaluation.voc.metrics.iou_matrix`).

Box targets (Girshick 2015, eq. 1 of R-CNN's appendix C), for a proposal P and its ground
truth G with w = x2 - x1 + 1, cx = x1 + w / 2 (likewise h, cy):

    t = ((Gcx - Pcx) / Pw, (Gcy - Pcy) / Ph, log(Gw / Pw), log(Gh / Ph))

normalised as (t - means) / stds with the fixed means 0 and stds (0.1, 0.1, 0.2, 0.2) that
later Fast R-CNN code precomputes (Fast R-CNN itself took them from the training targets;
both make the four targets about unit scale). Decoding inverts this exactly:
x1 = cx - w / 2 and x2 = cx + w / 2 - 1.
"""

from __future__ import annotations

import numpy as np

from evaluation.voc.metrics import as_boxes, iou_matrix

BBOX_MEANS = (0.0, 0.0, 0.0, 0.0)
BBOX_STDS = (0.1, 0.1, 0.2, 0.2)
# exp(dw) is capped so that a wild prediction cannot overflow (log(1000 / 16), as is usual).
_MAX_LOG_SCALE = float(np.log(1000.0 / 16.0))

__all__ = ["BBOX_MEANS", "BBOX_STDS", "clip_boxes", "decode", "encode", "flip_boxes",
           "iou_matrix", "nms"]


def _centres(boxes: np.ndarray) -> tuple[np.ndarray, ...]:
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


def encode(proposals, gt, means=BBOX_MEANS, stds=BBOX_STDS) -> np.ndarray:
    """Normalised regression targets [N, 4] that move `proposals` [N, 4] onto `gt` [N, 4]."""
    proposals, gt = as_boxes(proposals), as_boxes(gt)
    if proposals.shape != gt.shape:
        raise ValueError(f"proposals {proposals.shape} and gt {gt.shape} differ in shape")
    pcx, pcy, pw, ph = _centres(proposals)
    gcx, gcy, gw, gh = _centres(gt)
    t = np.stack([(gcx - pcx) / pw, (gcy - pcy) / ph, np.log(gw / pw), np.log(gh / ph)], axis=1)
    return (t - np.asarray(means)) / np.asarray(stds)


def decode(proposals, deltas, means=BBOX_MEANS, stds=BBOX_STDS) -> np.ndarray:
    """Boxes [N, 4] from `proposals` [N, 4] and normalised deltas [N, 4] (inverse of encode).

    `deltas` may also be [N, 4K] (one set per class): the result is then [N, 4K].
    """
    proposals = as_boxes(proposals)
    deltas = np.asarray(deltas, dtype=np.float64)
    if deltas.ndim != 2 or deltas.shape[0] != proposals.shape[0] or deltas.shape[1] % 4:
        raise ValueError(f"deltas must be [N, 4K] for {proposals.shape[0]} proposals; got "
                         f"{deltas.shape}")
    k = deltas.shape[1] // 4
    t = deltas.reshape(-1, k, 4) * np.asarray(stds) + np.asarray(means)
    pcx, pcy, pw, ph = (v[:, None] for v in _centres(proposals))
    cx = t[..., 0] * pw + pcx
    cy = t[..., 1] * ph + pcy
    w = np.exp(np.minimum(t[..., 2], _MAX_LOG_SCALE)) * pw
    h = np.exp(np.minimum(t[..., 3], _MAX_LOG_SCALE)) * ph
    out = np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w - 1, cy + 0.5 * h - 1], axis=-1)
    return out.reshape(-1, 4 * k)


def clip_boxes(boxes, height: int, width: int) -> np.ndarray:
    """Clip [N, 4K] 1-based boxes to the image: x in [1, width], y in [1, height]."""
    boxes = np.array(boxes, dtype=np.float64)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 1, width)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 1, height)
    return boxes


def flip_boxes(boxes, width: int) -> np.ndarray:
    """Mirror 1-based inclusive boxes [N, 4] in an image `width` pixels wide (x -> W + 1 - x)."""
    boxes = np.array(boxes)
    return np.stack([width + 1 - boxes[:, 2], boxes[:, 1], width + 1 - boxes[:, 0],
                     boxes[:, 3]], axis=1).astype(boxes.dtype)


def nms(boxes, scores, threshold: float = 0.3) -> np.ndarray:
    """Greedy non-maximum suppression: the indices kept, best score first.

    Boxes are visited by a stable sort on -score (ties keep the input order); each kept box
    removes every remaining box whose IoU with it (`iou_matrix`) exceeds `threshold`.

    Args:
      boxes: [N, 4] inclusive boxes.
      scores: [N] scores.
      threshold: the IoU above which a box is suppressed (Fast R-CNN tests with 0.3).

    Returns:
      [K] int64 indices into `boxes`.
    """
    boxes = as_boxes(boxes)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size != boxes.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {scores.size} scores")
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        iou = iou_matrix(boxes[i:i + 1], boxes[rest])[0]
        order = rest[iou <= threshold]
    return np.asarray(keep, dtype=np.int64)
