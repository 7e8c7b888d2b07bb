"""Boxes: IoU with +1 pixels, Fast R-CNN target encoding/decoding, flips, NMS."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.voc.fast_rcnn import boxes as box_ops


def random_boxes(rng: np.random.Generator, n: int, size: int = 60) -> np.ndarray:
    x1 = rng.integers(1, size, n)
    y1 = rng.integers(1, size, n)
    return np.stack([x1, y1, x1 + rng.integers(0, 30, n), y1 + rng.integers(0, 30, n)], axis=1)


def devkit_iou(a, b) -> float:
    """VOCevaldet's overlap of two boxes, written out as the devkit's MATLAB does it."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    union = ((a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
             - iw * ih)
    return iw * ih / union


def test_iou_hand_values_and_devkit_oracle():
    a = np.array([[1, 1, 10, 10]])
    b = np.array([[6, 1, 15, 10],   # 5 x 10 overlap of two 100-pixel boxes: 50 / 150
                  [11, 1, 20, 10],  # touching, no shared pixel
                  [10, 10, 10, 10],  # a single shared pixel: 1 / 100
                  [1, 1, 10, 10]])
    np.testing.assert_allclose(box_ops.iou_matrix(a, b), [[1 / 3, 0, 1 / 100, 1]])
    rng = np.random.default_rng(0)
    x, y = random_boxes(rng, 7), random_boxes(rng, 9)
    expected = np.array([[devkit_iou(a, b) for b in y] for a in x])
    np.testing.assert_allclose(box_ops.iou_matrix(x, y), expected, rtol=1e-12)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        box_ops.iou_matrix(np.zeros((2, 3)), y)


def test_encode_hand_values():
    # Proposal and gt 10 px wide; the gt centre is 2 px right: tx = 0.2 / 0.1 = 2.
    # The gt is twice as tall: th = log(2) / 0.2.
    t = box_ops.encode([[1, 1, 10, 10]], [[3, 1, 12, 20]])
    cy = (1 + 10) - (1 + 5)  # gt centre 11, proposal centre 6
    np.testing.assert_allclose(t, [[2.0, cy / 10 / 0.1, 0.0, np.log(2) / 0.2]])
    raw = box_ops.encode([[1, 1, 10, 10]], [[3, 1, 12, 20]], stds=(1, 1, 1, 1))
    np.testing.assert_allclose(raw, [[0.2, 0.5, 0.0, np.log(2)]])


def test_encode_decode_round_trip():
    rng = np.random.default_rng(1)
    proposals, gt = random_boxes(rng, 50), random_boxes(rng, 50)
    settings = [(box_ops.BBOX_MEANS, box_ops.BBOX_STDS), ((0.1, -0.2, 0.3, 0), (1, 2, 3, 4))]
    for means, stds in settings:
        deltas = box_ops.encode(proposals, gt, means, stds)
        np.testing.assert_allclose(box_ops.decode(proposals, deltas, means, stds), gt, atol=1e-9)
    # Per-class deltas [N, 4K]: class k's columns decode independently.
    deltas = np.concatenate([box_ops.encode(proposals, proposals), box_ops.encode(proposals, gt)],
                            axis=1)
    decoded = box_ops.decode(proposals, deltas)
    np.testing.assert_allclose(decoded[:, :4], proposals, atol=1e-9)
    np.testing.assert_allclose(decoded[:, 4:], gt, atol=1e-9)
    with pytest.raises(ValueError, match="deltas"):
        box_ops.decode(proposals, deltas[:, :6])


def test_clip_and_flip():
    clipped = box_ops.clip_boxes([[-5, 0, 30, 12, 2, 3, 4, 5]], height=10, width=20)
    np.testing.assert_array_equal(clipped, [[1, 1, 20, 10, 2, 3, 4, 5]])
    boxes = np.array([[1, 2, 3, 4], [5, 1, 10, 9]])
    np.testing.assert_array_equal(box_ops.flip_boxes(boxes, 10), [[8, 2, 10, 4], [1, 1, 6, 9]])
    np.testing.assert_array_equal(box_ops.flip_boxes(box_ops.flip_boxes(boxes, 10), 10), boxes)
    # The mirrored box covers the mirrored pixels.
    mask = np.zeros((10, 10), bool)
    mask[1:9, 4:10] = True  # rows y 2..9 and columns x 5..10 (1-based)
    x1, y1, x2, y2 = box_ops.flip_boxes(np.array([[5, 2, 10, 9]]), 10)[0]
    flipped = np.zeros_like(mask)
    flipped[y1 - 1:y2, x1 - 1:x2] = True
    np.testing.assert_array_equal(flipped, mask[:, ::-1])


def reference_nms(boxes, scores, threshold):
    """Greedy NMS written out with explicit loops and the devkit IoU."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    suppressed = set()
    keep = []
    for rank, i in enumerate(order):
        if i in suppressed:
            continue
        keep.append(i)
        for j in order[rank + 1:]:
            if j not in suppressed and devkit_iou(boxes[i], boxes[j]) > threshold:
                suppressed.add(j)
    return keep


def test_nms_matches_reference():
    rng = np.random.default_rng(2)
    for trial in range(20):
        boxes = random_boxes(rng, 40, size=40)
        scores = rng.integers(0, 6, 40).astype(float) if trial % 2 else rng.random(40)  # ties
        for threshold in (0.0, 0.3, 0.5, 0.7):
            np.testing.assert_array_equal(box_ops.nms(boxes, scores, threshold),
                                          reference_nms(boxes, scores, threshold))


def test_nms_hand_case():
    boxes = np.array([[1, 1, 10, 10], [2, 1, 11, 10], [30, 30, 40, 40], [6, 1, 15, 10]])
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    # Box 1 overlaps box 0 with IoU 90 / 110 > 0.3; box 3 with 50 / 150 = 1/3 > 0.3.
    assert box_ops.nms(boxes, scores, 0.3).tolist() == [0, 2]
    # At 0.5 box 3 (IoU 1/3 with box 0) survives.
    assert box_ops.nms(boxes, scores, 0.5).tolist() == [0, 2, 3]
    assert box_ops.nms(np.zeros((0, 4)), np.zeros(0)).tolist() == []
