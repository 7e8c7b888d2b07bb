"""The random-init baseline's calibration images and the choice of the stronger row."""

import numpy as np
import pytest

from data import digits
from evaluation.random_init import pretraining_images, stronger


def test_the_calibration_images_of_digits_are_its_1198_train_images_in_order():
    images = np.stack(list(pretraining_images("digits", (8, 8, 1)).as_numpy_iterator()))
    train, _ = digits.split_arrays("train")
    assert images.shape == (1198, 8, 8, 1) and len(train) == 1198
    np.testing.assert_allclose(images, np.asarray(train, np.float32).reshape(images.shape),
                               atol=1e-6)
    assert len(list(pretraining_images("digits", (8, 8, 1), limit=5))) == 5


def test_the_stronger_row_has_the_higher_mean():
    assert stronger({"a": [0.5, 0.9], "b": [0.8, 0.7]}) == "b"
    assert stronger({"a": [0.75], "b": [0.75]}) == "a"  # a tie keeps the first
    with pytest.raises(ValueError):
        stronger({})
