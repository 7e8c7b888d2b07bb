"""Fixed (non-trainable) input preprocessing layers.

NAT (Bojanowski & Joulin 2017, Section 3.3 and Table 2) trains on grayscale image gradients
rather than raw pixels, so that the network cannot cluster images by colour. Table 2 compares
three inputs: clean RGB, high-pass filtered, and Sobel gradients. Each is a layer here, so the
preprocessing lives inside the model graph and inside every export.

All layers take float images [N, H, W, C] with C = 1 (grayscale) or 3 (RGB), in any value
range: they are linear, so scaling the input scales the output.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from models import PREPROCESSINGS
from runtime.errors import InvalidInput

SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=np.float32)
"""Horizontal-gradient kernel, applied as a cross-correlation:
out[y, x] = sum_ij K[i, j] in[y + i - 1, x + j - 1]."""
SOBEL_Y = SOBEL_X.T.copy()
"""Vertical-gradient kernel (the transpose of `SOBEL_X`)."""


def _check_image_channels(layer_name: str, input_shape: tuple) -> int:
    if len(input_shape) != 4:
        raise InvalidInput(f"{layer_name} expects images [N, H, W, C]; got shape {input_shape}")
    channels = input_shape[-1]
    if channels not in (1, 3):
        raise InvalidInput(f"{layer_name} expects 1 or 3 channels; got {channels}")
    return channels


@keras.saving.register_keras_serializable(package="zoo")
class Grayscale(keras.layers.Layer):
    """[N, H, W, C] -> [N, H, W, 1]: the mean over channels (identity on one channel)."""

    def build(self, input_shape):
        _check_image_channels(self.name, tuple(input_shape))
        self.built = True

    def call(self, images):
        return ops.mean(images, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 1)


@keras.saving.register_keras_serializable(package="zoo")
class Sobel(keras.layers.Layer):
    """Grayscale image gradients: [N, H, W, C] -> [N, H, W, 2] = (dx, dy).

    The image is first made grayscale by the channel mean, then convolved ("same" zero padding,
    stride 1) with the 3x3 Sobel kernels `SOBEL_X` and `SOBEL_Y`. The convolution is frozen:
    its kernel [3, 3, 1, 2] and its bias [2] (all zeros) are non-trainable weights, so they are
    saved with the model and reported as frozen parameters, but no optimiser ever moves them.
    """

    def build(self, input_shape):
        _check_image_channels(self.name, tuple(input_shape))
        kernel = np.stack([SOBEL_X, SOBEL_Y], axis=-1)[:, :, None, :]
        self.kernel = self.add_weight(
            name="kernel",
            shape=(3, 3, 1, 2),
            initializer=keras.initializers.Constant(kernel),
            trainable=False,
        )
        self.bias = self.add_weight(
            name="bias", shape=(2,), initializer="zeros", trainable=False
        )
        self.built = True

    def call(self, images):
        gray = ops.mean(images, axis=-1, keepdims=True)
        grads = ops.conv(gray, ops.cast(self.kernel, gray.dtype), strides=1, padding="same")
        return grads + ops.cast(self.bias, gray.dtype)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 2)


def gaussian_kernel_1d(sigma: float, radius: int) -> np.ndarray:
    """Normalised 1-D Gaussian taps at offsets -radius..radius."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


@keras.saving.register_keras_serializable(package="zoo")
class HighPass(keras.layers.Layer):
    """The image minus its Gaussian blur, per channel: [N, H, W, C] -> [N, H, W, C].

    The blur is a separable Gaussian of standard deviation `sigma` pixels and radius
    `ceil(3 sigma)`, computed with reflected borders so that the image border does not show up
    as a spurious edge. Removing the low frequencies removes flat colour regions, the trivial
    cue that NAT's preprocessing is meant to hide (NAT Table 2, "high-pass").
    """

    def __init__(self, sigma: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        if sigma <= 0:
            raise InvalidInput(f"HighPass sigma must be > 0; got {sigma}")
        self.sigma = float(sigma)
        self.radius = int(np.ceil(3.0 * self.sigma))

    def build(self, input_shape):
        channels = _check_image_channels(self.name, tuple(input_shape))
        taps = gaussian_kernel_1d(self.sigma, self.radius)
        self._rows = np.tile(taps.reshape(-1, 1, 1, 1), (1, 1, channels, 1))
        self._cols = np.tile(taps.reshape(1, -1, 1, 1), (1, 1, channels, 1))
        self.built = True

    def call(self, images):
        r = self.radius
        padded = ops.pad(images, [[0, 0], [r, r], [r, r], [0, 0]], mode="reflect")
        blur = ops.depthwise_conv(padded, ops.cast(self._rows, images.dtype), padding="valid")
        blur = ops.depthwise_conv(blur, ops.cast(self._cols, images.dtype), padding="valid")
        return images - blur

    def get_config(self):
        return {**super().get_config(), "sigma": self.sigma}


@keras.saving.register_keras_serializable(package="zoo")
class L2Normalize(keras.layers.Layer):
    """Rows scaled to unit L2 norm: z / max(||z||, eps). Computed in float32."""

    def __init__(self, epsilon: float = 1e-12, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, x):
        x = ops.cast(x, "float32")
        norm = ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True))
        return x / ops.maximum(norm, self.epsilon)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def batch_norm(name: str) -> keras.layers.BatchNormalization:
    """The zoo's batch normalisation.

    Momentum 0.9 and epsilon 1e-5 are Torch's defaults, which the papers' code used. Under
    tf.distribute the statistics are computed over the global batch (`synchronized=True`), so
    a step on N replicas is the single-device step on the same global batch: NAT and SC
    results do not depend on how the batch is split. On one device this changes nothing.
    """
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                           synchronized=True, name=name)


def preprocessing_layer(name: str) -> keras.layers.Layer | None:
    """The fixed front for `name` in PREPROCESSINGS ("rgb" means none: returns None)."""
    if name == "sobel":
        return Sobel(name="sobel")
    if name == "gray":
        return Grayscale(name="grayscale")
    if name == "highpass":
        return HighPass(name="highpass")
    if name == "rgb":
        return None
    raise ValueError(f"unknown preprocessing {name!r}; choose one of {', '.join(PREPROCESSINGS)}")
