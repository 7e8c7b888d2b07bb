"""RoI max-pooling against a NumPy oracle of bilinear sampling and max."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from evaluation.voc.fast_rcnn import roi_pool
from models import build_model


def bilinear(feature: np.ndarray, y: float, x: float) -> np.ndarray:
    """feature [H, W, C] at a real point inside the map (bilinear interpolation)."""
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    y1, x1 = min(y0 + 1, feature.shape[0] - 1), min(x0 + 1, feature.shape[1] - 1)
    dy, dx = y - y0, x - x0
    return ((1 - dy) * (1 - dx) * feature[y0, x0] + (1 - dy) * dx * feature[y0, x1]
            + dy * (1 - dx) * feature[y1, x0] + dy * dx * feature[y1, x1])


def oracle(features, boxes, indices, pooled, sampling, stride=16.0, offset=15.0):
    """Each bin: max over its sampling^2 points, laid evenly (ends included) over the RoI."""
    _, height, width, channels = features.shape
    out = np.zeros((len(boxes), pooled, pooled, channels))
    n = pooled * sampling
    for r, ((x1, y1, x2, y2), b) in enumerate(zip(boxes, indices, strict=True)):
        fy1, fy2 = (np.clip((v - offset) / stride, 0, height - 1) for v in (y1, y2))
        fx1, fx2 = (np.clip((v - offset) / stride, 0, width - 1) for v in (x1, x2))
        ys = [fy1 + i * (fy2 - fy1) / (n - 1) for i in range(n)]
        xs = [fx1 + j * (fx2 - fx1) / (n - 1) for j in range(n)]
        samples = np.array([[bilinear(features[b], y, x) for x in xs] for y in ys])
        for i in range(pooled):
            for j in range(pooled):
                out[r, i, j] = samples[i * sampling:(i + 1) * sampling,
                                       j * sampling:(j + 1) * sampling].max(axis=(0, 1))
    return out


def test_matches_numpy_oracle():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
    boxes = np.array([[15, 15, 111, 79],      # the whole map of image 0
                      [20.5, 30.25, 60, 44],  # fractional, inside
                      [-40, -10, 300, 40],    # past the border: clipped
                      [50, 50, 50, 50],       # a single point
                      [0, 70, 100, 80]], np.float32)
    indices = np.array([0, 1, 0, 1, 1], np.int32)
    for pooled, sampling in ((6, 2), (3, 1), (2, 3)):
        got = roi_pool.roi_max_pool(tf.constant(features), tf.constant(boxes),
                                    tf.constant(indices), pooled, sampling).numpy()
        np.testing.assert_allclose(got, oracle(features, boxes, indices, pooled, sampling),
                                   rtol=1e-5, atol=1e-5)


def test_cell_aligned_roi_is_exact_max_pooling():
    # A RoI from cell 0 to cell 3 on a 4 x 4 map, 2 x 2 bins of 2 samples: the samples fall
    # on the cells, so each bin is the max of a 2 x 2 block of cells, and its gradient goes
    # to that block's maximum only.
    rng = np.random.default_rng(1)
    features = tf.constant(rng.permutation(16).reshape(1, 4, 4, 1).astype(np.float32))
    boxes = tf.constant([[15, 15, 15 + 3 * 16, 15 + 3 * 16]], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(features)
        pooled = roi_pool.roi_max_pool(features, boxes, tf.zeros([1], tf.int32), 2, 2)
        total = tf.reduce_sum(pooled)
    blocks = features.numpy()[0, :, :, 0].reshape(2, 2, 2, 2).max(axis=(1, 3))
    np.testing.assert_array_equal(pooled.numpy()[0, :, :, 0], blocks)
    grad = tape.gradient(total, features).numpy()[0, :, :, 0]
    np.testing.assert_array_equal(grad, features.numpy()[0, :, :, 0] >= np.kron(
        blocks, np.ones((2, 2))))


def test_alexnet_conv5_geometry():
    # Cell k of conv5 is centred on input pixel 16 k + 15. An impulse at column p changes
    # the conv5 columns whose receptive field holds p; that set is centred on column 6 for a
    # range of p, and the receptive fields being symmetric, that range is centred on
    # 16 * 6 + 15 = 111 (likewise for columns 5 and 7).
    net = build_model("alexnet", input_shape=(227, 227, 3), preprocessing="rgb", head="none")
    columns = np.arange(80, 150)
    images = np.zeros((len(columns) + 1, 227, 227, 3), np.float32)
    images[np.arange(len(columns)), 113, columns] = 100.0
    conv5 = net(images, training=False)["conv5"].numpy()
    changed = np.abs(conv5[:-1] - conv5[-1:]).max(axis=(1, 3)) > 1e-6  # [p, column]
    middle = np.array([(np.flatnonzero(c).min() + np.flatnonzero(c).max()) / 2
                       for c in changed])
    for cell in (5, 6, 7):
        centred = columns[middle == cell]
        assert centred.size and (centred.min() + centred.max()) / 2 == 16 * cell + 15, centred
    np.testing.assert_allclose(roi_pool.pixel_to_feature(tf.constant([15.0, 31.0, 175.0])),
                               [0.0, 1.0, 10.0])
