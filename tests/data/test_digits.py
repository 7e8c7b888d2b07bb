"""The embedded digits and their fixed split."""

import numpy as np
from sklearn.datasets import load_digits

from data import digits, labelled


def test_digits_arrays_are_sklearn_digits_over_16():
    images, labels = digits.digits_arrays()
    reference = load_digits()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
    assert labels.shape == (1797,) and np.issubdtype(labels.dtype, np.integer)
    np.testing.assert_array_equal(images[..., 0] * 16.0, reference.images)
    np.testing.assert_array_equal(labels, reference.target)
    assert images.min() == 0.0 and images.max() == 1.0


def test_digits_splits_partition_the_digits():
    train, test = digits.split_indices("train"), digits.split_indices("test")
    assert len(train) == 1198 and len(test) == 599
    assert not set(train) & set(test)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    assert all(i % 3 == 2 for i in test)
    np.testing.assert_array_equal(labelled.load_labels("digits", "test"),
                                  digits.digits_arrays()[1][test])
