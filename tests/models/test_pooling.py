"""models/pooling.py against NumPy oracles: the bins, every pooling, the probes' grid rule."""

import numpy as np
import pytest
import tensorflow as tf

from models.pooling import adaptive_bins, adaptive_pool, check_pooling, grid_for, pool_features
from runtime.errors import InvalidInput


def test_adaptive_bins_by_hand():
    # 13 -> 6 cells: start floor(13 i / 6), stop ceil(13 (i + 1) / 6).
    assert adaptive_bins(13, 6) == [(0, 3), (2, 5), (4, 7), (6, 9), (8, 11), (10, 13)]
    assert adaptive_bins(4, 2) == [(0, 2), (2, 4)]
    assert adaptive_bins(5, 1) == [(0, 5)]


def test_pool_features_match_numpy():
    x = np.random.default_rng(0).normal(size=(2, 13, 7, 3)).astype(np.float32)
    np.testing.assert_array_equal(pool_features(x, "none").numpy(), x)
    np.testing.assert_array_equal(pool_features(x, "flatten").numpy(), x.reshape(2, -1))
    np.testing.assert_allclose(pool_features(x, "avg").numpy(), x.mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_array_equal(pool_features(x, "max").numpy(), x.max(axis=(1, 2)))
    for kind, reduce in (("max", np.max), ("avg", np.mean)):
        want = np.empty((2, 6, 4, 3), np.float32)
        for i, (r0, r1) in enumerate(adaptive_bins(13, 6)):
            for j, (c0, c1) in enumerate(adaptive_bins(7, 4)):
                want[:, i, j] = reduce(x[:, r0:r1, c0:c1], axis=(1, 2))
        got = pool_features(x, f"{kind}6x4").numpy()
        np.testing.assert_allclose(got, want.reshape(2, -1), rtol=1e-6)
    assert pool_features(x.astype(np.float16), "max").dtype == tf.float32


def test_check_pooling_rejects_bad_specs():
    with pytest.raises(InvalidInput, match="unknown pooling 'mean'"):
        check_pooling("mean", (4, 4, 8))
    with pytest.raises(InvalidInput, match="needs a feature map"):
        check_pooling("avg", (128,))
    with pytest.raises(InvalidInput, match="1 <= K <= 4"):
        check_pooling("max5x2", (4, 4, 8))
    check_pooling("none", (128,))
    check_pooling("max4x4", (4, 4, 8))


def test_adaptive_pool_matches_numpy_bins_and_is_the_identity_at_full_size():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 5, 3)).astype(np.float32)
    rows = [(0, 3), (2, 5), (4, 7)]  # floor(i 7 / 3), ceil((i + 1) 7 / 3)
    cols = [(0, 3), (2, 5)]  # floor(j 5 / 2), ceil((j + 1) 5 / 2)
    for mode, reduce in (("avg", np.mean), ("max", np.max)):
        out = adaptive_pool(tf.constant(x), (3, 2), mode).numpy()
        expected = np.stack([np.stack([reduce(x[:, r0:r1, c0:c1], axis=(1, 2))
                                       for c0, c1 in cols], axis=1) for r0, r1 in rows], axis=1)
        np.testing.assert_allclose(out, expected, rtol=1e-6)
        # pool_features flattens the same grid in (row, column, channel) order
        np.testing.assert_allclose(pool_features(x, f"{mode}3x2").numpy(),
                                   expected.reshape(2, -1), rtol=1e-6)
    np.testing.assert_array_equal(adaptive_pool(tf.constant(x), (7, 5)).numpy(), x)


def test_grid_from_max_dims_or_stated():
    assert grid_for((13, 13, 256)) == (6, 6)  # 6 * 6 * 256 = 9216
    assert grid_for((55, 55, 96)) == (9, 9)  # 9 * 9 * 96 = 7776 <= 9216 < 10 * 10 * 96
    assert grid_for((7, 7, 64)) == (7, 7)  # 3136 dims: no pooling
    assert grid_for((7, 5, 64), pool_size=2) == (2, 2)
    assert grid_for((3, 3, 4096), max_dims=100) == (1, 1)
    with pytest.raises(ValueError, match="pool_size must be >= 1"):
        grid_for((3, 3, 4), pool_size=0)
