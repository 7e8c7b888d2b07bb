"""Batch-normalisation statistics measured on data: the random-init baseline's BN calibration.

A network at its initialisation has BN moving statistics (mean 0, variance 1) that normalise
nothing, so in inference mode its BN layers are plain affine maps. `calibrate_batchnorm` sets
each BN layer's moving mean and variance to the exact statistics of that layer's inputs over a
set of images, the network in inference mode with every earlier BN layer already calibrated:
the statistics the layer would see if the whole set were one batch. No weight other than the
BN moving statistics changes, and nothing is learned.

It lives beside the networks because it rewrites a network's variables: the evaluation code
only reads features of a frozen network, and every binary that compares with random init
(pretraining, ablation, probes, export) can import it from here.

Exactness, not a running average: the layers are visited in the network's order and, for
each, one inference pass over all images accumulates the per-channel sum and sum of squares of
its inputs in float64; mean = sum / n and variance = sum of squares / n - mean^2 (the
population variance, as BN uses for a batch). Cost: one pass over the images per BN layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import keras
import numpy as np
import tensorflow as tf


def batchnorm_layers(model) -> list:
    """The BatchNormalization layers of `model` in its (topological) layer order."""
    return [layer for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)]


def _input_moments(model, layer, batches: Iterable) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, population variance, count) per channel of `layer`'s inputs over the batches."""
    probe = keras.Model(model.inputs, layer.input)
    rank = len(layer.input.shape)
    axis = layer.axis % rank if isinstance(layer.axis, int) else layer.axis[0] % rank
    reduce = [a for a in range(rank) if a != axis]

    @tf.function(reduce_retracing=True)
    def moments(images):
        x = tf.cast(probe(images, training=False), tf.float64)
        return (tf.reduce_sum(x, reduce), tf.reduce_sum(tf.square(x), reduce),
                tf.cast(tf.size(x) // tf.shape(x)[axis], tf.float64))

    total = total_sq = None
    count = 0.0
    for images in batches:
        s, sq, n = moments(images)
        total = s.numpy() if total is None else total + s.numpy()
        total_sq = sq.numpy() if total_sq is None else total_sq + sq.numpy()
        count += float(n.numpy())
    if total is None:
        raise ValueError("no images to calibrate the batch normalisation on")
    mean = total / count
    return mean, np.maximum(total_sq / count - mean ** 2, 0.0), int(count)


def calibrate_batchnorm(model, images: tf.data.Dataset | np.ndarray,
                        batch_size: int = 256) -> int:
    """Set every BN layer's moving mean/variance to the exact statistics of its inputs over
    `images` (module docstring); returns the number of BN layers set.

    Args:
      model: a functional keras.Model (its BN layers are found in `model.layers`).
      images: float images [N, H, W, C] as an array, or an unbatched tf.data.Dataset of images
        (or of (image, label) pairs, whose labels are ignored).
      batch_size: images per inference pass (the statistics do not depend on it).
    """
    if isinstance(images, np.ndarray):
        dataset = tf.data.Dataset.from_tensor_slices(images.astype(np.float32))
    else:
        dataset = images
        if isinstance(dataset.element_spec, tuple):
            dataset = dataset.map(lambda x, *_: x)
    dataset = dataset.batch(batch_size).prefetch(2)
    layers = batchnorm_layers(model)
    for layer in layers:
        mean, variance, _ = _input_moments(model, layer, dataset)
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
    return len(layers)
