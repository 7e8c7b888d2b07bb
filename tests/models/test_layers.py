"""The fixed preprocessing layers against independent scipy oracles."""

import keras
import numpy as np
import pytest
import scipy.ndimage

from models.layers import SOBEL_X, SOBEL_Y, Grayscale, HighPass, L2Normalize, Sobel
from runtime.errors import InvalidInput


def _images(channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (3, 9, 11, channels)).astype(np.float32)


def _sobel_oracle(images: np.ndarray) -> np.ndarray:
    """Channel mean, then 3x3 cross-correlation with zero padding ("same")."""
    gray = images.mean(axis=-1).astype(np.float64)
    dx = np.stack([scipy.ndimage.correlate(g, SOBEL_X.astype(np.float64), mode="constant")
                   for g in gray])
    dy = np.stack([scipy.ndimage.correlate(g, SOBEL_Y.astype(np.float64), mode="constant")
                   for g in gray])
    return np.stack([dx, dy], axis=-1)


@pytest.mark.parametrize("channels", [1, 3])
def test_sobel_matches_scipy_correlation(channels):
    images = _images(channels)
    out = keras.ops.convert_to_numpy(Sobel()(images))
    assert out.shape == (3, 9, 11, 2)
    np.testing.assert_allclose(out, _sobel_oracle(images), atol=1e-5)


def test_sobel_kernels_are_the_textbook_gradients():
    # dx responds +8 to a unit step rising to the right, dy to one rising downwards
    # (1 + 2 + 1 times the step of 2 columns/rows apart).
    ramp = np.zeros((1, 5, 5, 1), np.float32)
    ramp[..., 3:, 0] = 1.0
    out = keras.ops.convert_to_numpy(Sobel()(ramp))
    assert out[0, 2, 2, 0] == pytest.approx(4.0)
    assert out[0, 2, 2, 1] == pytest.approx(0.0)
    down = np.transpose(ramp, (0, 2, 1, 3))
    out = keras.ops.convert_to_numpy(Sobel()(down))
    assert out[0, 2, 2, 1] == pytest.approx(4.0)
    assert out[0, 2, 2, 0] == pytest.approx(0.0)


def test_sobel_is_frozen_with_zero_bias():
    layer = Sobel()
    layer.build((None, 8, 8, 3))
    assert layer.trainable_weights == []
    assert len(layer.non_trainable_weights) == 2
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.bias), np.zeros(2))
    # A constant image has no gradient away from the zero-padded border: no bias leaks in.
    flat = np.full((1, 6, 6, 3), 0.7, np.float32)
    out = keras.ops.convert_to_numpy(layer(flat))
    np.testing.assert_allclose(out[0, 1:-1, 1:-1], 0.0, atol=1e-6)


def test_sobel_is_not_moved_by_training():
    inputs = keras.Input((8, 8, 1))
    outputs = keras.layers.Dense(1)(keras.layers.Flatten()(Sobel(name="sobel")(inputs)))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    before = [keras.ops.convert_to_numpy(w) for w in model.get_layer("sobel").weights]
    x = np.random.default_rng(1).normal(size=(16, 8, 8, 1)).astype(np.float32)
    model.fit(x, np.ones((16, 1), np.float32), epochs=2, verbose=0)
    after = [keras.ops.convert_to_numpy(w) for w in model.get_layer("sobel").weights]
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(b, a)


def test_grayscale_is_the_channel_mean():
    images = _images(3)
    out = keras.ops.convert_to_numpy(Grayscale()(images))
    np.testing.assert_allclose(out, images.mean(axis=-1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_highpass_is_image_minus_gaussian_blur(channels):
    images = _images(channels, seed=2)
    sigma = 1.5
    out = keras.ops.convert_to_numpy(HighPass(sigma=sigma)(images))
    # TF's REFLECT padding (d c b | a b c d) is scipy's "mirror" mode; same radius ceil(3 sigma).
    blur = np.stack([
        np.stack([scipy.ndimage.gaussian_filter(img[..., c].astype(np.float64), sigma,
                                                mode="mirror", truncate=3.0)
                  for c in range(channels)], axis=-1)
        for img in images
    ])
    np.testing.assert_allclose(out, images - blur, atol=1e-5)


def test_highpass_removes_constant_images():
    flat = np.full((2, 10, 10, 3), 0.3, np.float32)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(HighPass()(flat)), 0.0, atol=1e-6)


def test_l2_normalize_gives_unit_rows_and_keeps_zero_rows_finite():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    out = keras.ops.convert_to_numpy(L2Normalize()(x))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)


@pytest.mark.parametrize("layer", [Sobel, Grayscale, HighPass])
def test_layers_reject_bad_channel_counts(layer):
    with pytest.raises(InvalidInput, match="1 or 3 channels"):
        layer()(np.zeros((1, 8, 8, 2), np.float32))
