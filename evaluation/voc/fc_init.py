"""Initialisations of AlexNet's classifier layers for VOC classification: fc6-fc8 from
k-means centroids of their inputs (Krahenbuhl et al. 2015), or fc6-fc7 redrawn ("classifier
from scratch"). Used by evaluation/voc/classification_lib.py (--fc_init).
"""

from __future__ import annotations

import keras
import numpy as np
from sklearn.cluster import KMeans


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 20) -> np.ndarray:
    """Lloyd's k-means on the rows of x [N, D] (k <= N), seeded by k-means++ (scikit-learn,
    one initialisation, `iterations` iterations at most): centroids [k, D]."""
    solver = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=iterations,
                    random_state=int(rng.integers(2**31 - 1)))
    return solver.fit(np.asarray(x, np.float64)).cluster_centers_


def kmeans_dense_init(inputs: np.ndarray, units: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Data-dependent weights of a dense layer (Krahenbuhl et al. 2015, k-means variant).

    Args:
      inputs: [N, D] the layer's inputs on N training crops.
      units: the layer's width.

    Returns:
      (kernel [D, units], mean [units], var [units]): columns are the unit-norm k-means
      centroids of the centred inputs (min(N, units) of them; Gaussian directions for the
      rest), scaled so that inputs @ kernel has unit variance per column; mean and var are
      the statistics of inputs @ kernel (var is 1 up to rounding).
    """
    x = np.asarray(inputs, dtype=np.float64)
    centred = x - x.mean(axis=0)
    k = min(units, x.shape[0])
    columns = kmeans(centred, k, rng)
    if units > k:
        columns = np.concatenate([columns, rng.normal(size=(units - k, x.shape[1]))], axis=0)
    columns /= np.maximum(np.linalg.norm(columns, axis=1, keepdims=True), 1e-12)
    kernel = columns.T
    std = (x @ kernel).std(axis=0)
    kernel = kernel / np.maximum(std, 1e-8)
    out = x @ kernel
    return kernel.astype(np.float32), out.mean(axis=0), out.var(axis=0)


def apply_kmeans_init(net: keras.Model, images: np.ndarray, seed: int) -> None:
    """Re-initialise fc6, fc7 and fc8 in turn with `kmeans_dense_init` on `images`.

    fc6 and fc7 have no bias: their BN layers get the pre-activation statistics as moving
    mean and variance (gamma 1, beta 0), so BN outputs are centred and unit-variance. fc8 gets
    bias -mean. Each layer sees the outputs of the layers initialised before it.
    """
    rng = np.random.default_rng(seed)

    def endpoint_inputs(name: str) -> np.ndarray:
        outputs = net.predict(images, batch_size=32, verbose=0)
        return np.asarray(outputs[name]).reshape(len(images), -1)

    for layer_name, source in (("fc6", "pool5"), ("fc7", "fc6")):
        layer, bn = net.get_layer(layer_name), net.get_layer(f"{layer_name}_bn")
        kernel, mean, var = kmeans_dense_init(endpoint_inputs(source), layer.units, rng)
        layer.kernel.assign(kernel)
        bn.moving_mean.assign(mean.astype(np.float32))
        bn.moving_variance.assign(var.astype(np.float32))
        bn.gamma.assign(np.ones_like(mean, dtype=np.float32))
        bn.beta.assign(np.zeros_like(mean, dtype=np.float32))
    fc8 = net.get_layer("fc8")
    kernel, mean, _ = kmeans_dense_init(endpoint_inputs("fc7"), fc8.units, rng)
    fc8.kernel.assign(kernel)
    fc8.bias.assign((-mean).astype(np.float32))


def reinit_fc(net: keras.Model, seed: int) -> None:
    """Redraw fc6 and fc7 (kernels He-normal, BN reset): the "classifier from scratch" init."""
    for offset, name in enumerate(("fc6", "fc7")):
        layer, bn = net.get_layer(name), net.get_layer(f"{name}_bn")
        init = keras.initializers.HeNormal(seed=seed + offset)
        layer.kernel.assign(init(layer.kernel.shape))
        bn.gamma.assign(np.ones(bn.gamma.shape, np.float32))
        bn.beta.assign(np.zeros(bn.beta.shape, np.float32))
        bn.moving_mean.assign(np.zeros(bn.moving_mean.shape, np.float32))
        bn.moving_variance.assign(np.ones(bn.moving_variance.shape, np.float32))
