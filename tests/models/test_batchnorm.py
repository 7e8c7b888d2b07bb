"""BN calibration: the moving statistics become the exact statistics of each BN layer's inputs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.batchnorm import batchnorm_layers, calibrate_batchnorm


def _tiny(seed: int = 0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5, 5, 2))
    x = keras.layers.Conv2D(3, 1, name="conv")(inputs)
    x = keras.layers.BatchNormalization(epsilon=1e-3, name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(4, name="dense")(x)
    out = keras.layers.BatchNormalization(epsilon=1e-3, name="bn2")(x)
    model = keras.Model(inputs, {"out": out})
    rng = np.random.default_rng(seed)
    for layer in batchnorm_layers(model):  # non-trivial affine parts: BN2 depends on BN1
        layer.gamma.assign(rng.uniform(0.5, 2.0, layer.gamma.shape).astype(np.float32))
        layer.beta.assign(rng.normal(0, 1, layer.beta.shape).astype(np.float32))
    return model


def _numpy_oracle(model, images):
    """The BN inputs' mean/var computed by a NumPy forward pass, layer by layer."""
    conv, bn1, dense = (model.get_layer(n) for n in ("conv", "bn1", "dense"))
    kernel, bias = (w.numpy().astype(np.float64) for w in conv.weights)
    h1 = np.einsum("nhwc,cd->nhwd", images.astype(np.float64), kernel[0, 0]) + bias
    m1, v1 = h1.mean(axis=(0, 1, 2)), h1.var(axis=(0, 1, 2))
    gamma, beta = bn1.gamma.numpy(), bn1.beta.numpy()
    a1 = np.maximum(gamma * (h1 - m1) / np.sqrt(v1 + bn1.epsilon) + beta, 0.0)
    w2, b2 = (w.numpy().astype(np.float64) for w in dense.weights)
    h2 = a1.reshape(len(images), -1) @ w2 + b2
    return [(m1, v1), (h2.mean(axis=0), h2.var(axis=0))]


@pytest.mark.parametrize("as_dataset", [False, True])
def test_moving_statistics_equal_the_numpy_statistics_of_each_bn_input(as_dataset):
    images = np.random.default_rng(1).normal(2.0, 3.0, (37, 5, 5, 2)).astype(np.float32)
    model = _tiny()
    others = [w.numpy() for layer in model.layers if not isinstance(
        layer, keras.layers.BatchNormalization) for w in layer.weights]
    source = (tf.data.Dataset.from_tensor_slices((images, np.zeros(37, np.int64)))
              if as_dataset else images)
    assert calibrate_batchnorm(model, source, batch_size=8) == 2  # 8 does not divide 37
    for layer, (mean, var) in zip(batchnorm_layers(model), _numpy_oracle(model, images),
                                  strict=True):
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5, atol=1e-6)
    after = [w.numpy() for layer in model.layers if not isinstance(
        layer, keras.layers.BatchNormalization) for w in layer.weights]
    for a, b in zip(others, after, strict=True):
        np.testing.assert_array_equal(a, b)  # nothing but the BN statistics moves


def test_the_calibrated_network_normalises_its_inputs():
    images = np.random.default_rng(2).normal(5.0, 4.0, (20, 5, 5, 2)).astype(np.float32)
    model = _tiny()
    calibrate_batchnorm(model, images)
    for layer in batchnorm_layers(model):
        layer.gamma.assign(np.ones(layer.gamma.shape, np.float32))
        layer.beta.assign(np.zeros(layer.beta.shape, np.float32))
    calibrate_batchnorm(model, images)
    out = model(images, training=False)["out"].numpy()
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-4)
    bn2 = model.get_layer("bn2")
    variance = bn2.moving_variance.numpy()
    np.testing.assert_allclose(out.var(axis=0), variance / (variance + bn2.epsilon), rtol=1e-3)


def test_no_images_is_an_error():
    with pytest.raises(ValueError, match="no images"):
        calibrate_batchnorm(_tiny(), np.zeros((0, 5, 5, 2), np.float32))
