"""The Fast R-CNN RoI sampler: fractions, IoU ranges, labels and targets."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.voc.fast_rcnn import boxes as box_ops
from evaluation.voc.fast_rcnn.sampler import sample_rois

GT = np.array([[11, 11, 60, 60], [101, 21, 150, 100]])
LABELS = np.array([3, 7])


def proposals_around(rng: np.random.Generator, n: int) -> np.ndarray:
    """Boxes near the ground truth (a spread of IoUs) and far from it (IoU 0)."""
    near = GT[rng.integers(0, 2, n)] + rng.integers(-25, 26, (n, 4))
    near[:, 2:] = np.maximum(near[:, 2:], near[:, :2] + 4)
    far = np.array([[300, 300, 340, 350]] * 5) + rng.integers(0, 20, (5, 4))
    return np.concatenate([near, far])


def test_fractions_ranges_labels_and_targets():
    rng = np.random.default_rng(0)
    proposals = proposals_around(rng, 2000)
    candidates = np.concatenate([GT, proposals])
    ious = box_ops.iou_matrix(candidates, GT)
    best = ious.max(1)
    assert (best >= 0.5).sum() > 32 and ((best >= 0.1) & (best < 0.5)).sum() > 96
    sample = sample_rois(proposals, GT, LABELS, rng)
    assert len(sample.labels) == 128 and sample.num_foreground == 32  # 25% of 128
    fg = sample.labels > 0
    assert np.all(fg[:32]) and not np.any(fg[32:])  # foreground first
    # IoUs recomputed from the returned boxes: foreground >= 0.5, background in [0.1, 0.5).
    recomputed = box_ops.iou_matrix(sample.boxes, GT)
    np.testing.assert_allclose(recomputed.max(1), sample.ious)
    assert np.all(sample.ious[fg] >= 0.5)
    assert np.all((sample.ious[~fg] >= 0.1) & (sample.ious[~fg] < 0.5))
    # Labels are the class of the nearest ground truth; targets decode onto it.
    nearest = recomputed.argmax(1)
    np.testing.assert_array_equal(sample.labels[fg], LABELS[nearest[fg]])
    decoded = box_ops.decode(sample.boxes[fg], sample.targets[fg])
    np.testing.assert_allclose(decoded, GT[nearest[fg]], atol=1e-3)
    assert np.all(sample.targets[~fg] == 0)


def test_no_candidate_is_drawn_twice():
    rng = np.random.default_rng(1)
    # All candidates distinct, so a repeated box would be a repeated draw.
    proposals = np.unique(proposals_around(rng, 3000), axis=0)
    for _ in range(5):
        sample = sample_rois(proposals, GT, LABELS, rng)
        assert len({tuple(b) for b in sample.boxes}) == len(sample.boxes) == 128


def test_short_images_and_other_fractions():
    rng = np.random.default_rng(2)
    # The gt boxes and a proposal of IoU exactly 0.5 are foreground, two proposals are
    # background and one (IoU 0) is neither: 5 RoIs in all.
    proposals = np.array([[11, 11, 60, 110], [11, 11, 60, 120], [101, 21, 150, 250],
                          [400, 400, 410, 410]])
    ious = box_ops.iou_matrix(proposals, GT).max(1)
    np.testing.assert_allclose(ious, [0.5, 5 / 11, 8 / 23, 0])  # 2500 / 5000, ...
    sample = sample_rois(proposals, GT, LABELS, rng)
    assert sample.num_foreground == 3 and len(sample.labels) == 5
    # Without the gt boxes among the candidates, only the IoU-0.5 proposal is foreground.
    assert sample_rois(proposals, GT, LABELS, rng, include_gt=False).num_foreground == 1
    # No ground truth: nothing to learn from.
    assert len(sample_rois(proposals, np.zeros((0, 4)), np.zeros(0), rng).labels) == 0
    # Other settings: 50% of 16.
    many = proposals_around(rng, 500)
    sample = sample_rois(many, GT, LABELS, rng, num_rois=16, fg_fraction=0.5)
    assert sample.num_foreground == 8 and len(sample.labels) == 16


def test_bad_settings():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="bg_low <= bg_high"):
        sample_rois(GT, GT, LABELS, rng, bg_low=0.6)
    with pytest.raises(ValueError, match="labels"):
        sample_rois(GT, GT, LABELS[:1], rng)
