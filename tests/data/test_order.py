"""Epoch orders: a uniform permutation of every index for sources fetched by index, the
pipelines' shards of it, and how many classes a batch of a class-sorted folder mixes."""

import dataclasses
import itertools
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy.stats import chi2

from data import order
from data.augment import Augment
from data.pretrain import PretrainSource, epoch_elements, open_source, pretrain_dataset


def _indexed_source(n: int) -> PretrainSource:
    """Image i is 1x1 and holds i; fetched by index."""
    images = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)

    def elements():
        return tf.data.Dataset.from_tensor_slices((np.arange(n, dtype=np.int64), images))

    return PretrainSource("toy", n, (1, 1, 1), elements, lambda x: x, fixed_size=True,
                          gather=lambda indices: tf.gather(images, indices))


def test_permutation_is_the_argsort_of_its_seeded_keys():
    n = 1000
    orders = {}
    for seed, epoch in [(0, 0), (0, 1), (1, 0)]:
        keys = tf.random.stateless_uniform([n], [seed, -1 - epoch], minval=None, maxval=None,
                                           dtype=tf.int64).numpy()
        got = order.permutation(n, seed, epoch).numpy()
        np.testing.assert_array_equal(got, np.argsort(keys, kind="stable"))
        np.testing.assert_array_equal(np.sort(got), np.arange(n))  # every index once
        orders[seed, epoch] = tuple(got)
    assert len(set(orders.values())) == 3  # a new order per epoch and per seed


def test_permutation_draws_every_order_equally_often():
    # 4 indices: 24 orders, each with probability 1/24. The chi-square statistic of 2400
    # epochs' orders exceeds its 1e-6 quantile (23 degrees of freedom) with probability 1e-6
    # for a uniform draw.
    draws = 2400
    counts = dict.fromkeys(itertools.permutations(range(4)), 0)
    for epoch in range(draws):
        counts[tuple(order.permutation(4, 0, epoch).numpy())] += 1
    expected = draws / 24
    statistic = sum((c - expected) ** 2 / expected for c in counts.values())
    assert statistic < chi2.isf(1e-6, 23)


def test_the_stream_is_the_epochs_permutation_and_pipelines_take_its_positions():
    n, batch = 23, 5  # 4 steps of 5: the last 3 images of each epoch's order are left out
    source = _indexed_source(n)
    stream = pretrain_dataset(source, batch, Augment(crop="none"), seed=6, epochs=3)
    got = np.concatenate([i.numpy() for i, _ in stream])
    expected = np.concatenate([order.permutation(n, 6, e).numpy()[:20] for e in range(3)])
    np.testing.assert_array_equal(got, expected)
    shards = [[np.array([i.numpy() for i, _ in epoch_elements(source, 6, 2, p)(e)])
               for e in range(2)] for p in range(2)]
    for e in range(2):
        permutation = order.permutation(n, 6, e).numpy()
        for p in range(2):
            np.testing.assert_array_equal(shards[p][e], permutation[p::2])
    assert set(shards[0][0]) != set(shards[0][1])  # each epoch deals new shards


def _distinct_classes_of_a_uniform_draw(classes: int, per_class: int, draws: int
                                        ) -> tuple[float, float]:
    """(mean, standard deviation) of the number of classes among `draws` images drawn
    without replacement from `classes` classes of `per_class` images each."""
    n = classes * per_class
    k = np.arange(draws)
    miss_one = np.prod((n - per_class - k) / (n - k))  # a given class is not drawn
    miss_two = np.prod((n - 2 * per_class - k) / (n - k))
    mean = classes * (1 - miss_one)
    var = (classes * miss_one * (1 - miss_one)
           + classes * (classes - 1) * (miss_two - miss_one ** 2))
    return mean, float(np.sqrt(var))


def _class_sorted_folder(root, classes: int, per_class: int) -> None:
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c:02d}"))
        for i in range(per_class):
            Image.fromarray(np.full((2, 2), i, np.uint8)).save(
                os.path.join(root, f"class{c:02d}", f"{i:02d}.png"))


@pytest.mark.parametrize("indexed", [True, False])
def test_batches_of_a_class_sorted_folder_mix_classes_as_a_uniform_draw(
        tmp_path, monkeypatch, indexed):
    classes, per_class, batch = 40, 25, 64
    root = str(tmp_path / "sorted")
    _class_sorted_folder(root, classes, per_class)
    source = open_source(f"folder:{root}", (2, 2, 1))
    if not indexed:  # the streamed order, with blocks of 4 classes: it must fail the bound
        source = dataclasses.replace(source, gather=None)
        monkeypatch.setattr(order, "SHUFFLE_BUFFER", 4 * per_class)
    labels = np.array([int(os.path.basename(os.path.dirname(p))[5:]) for p in source.paths])
    assert list(labels) == sorted(labels)  # indices follow the classes
    stream = pretrain_dataset(source, batch, Augment(crop="none"), seed=2, epochs=1)
    distinct = [len(set(labels[i.numpy()])) for i, _ in stream]
    assert len(distinct) == classes * per_class // batch
    # The epoch's mean within 6 standard errors of a uniform draw's (about 32.1 classes).
    mean, sd = _distinct_classes_of_a_uniform_draw(classes, per_class, batch)
    within = abs(np.mean(distinct) - mean) < 6 * sd / np.sqrt(len(distinct))
    assert within == indexed, (np.mean(distinct), mean, sd)
