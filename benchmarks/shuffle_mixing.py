"""How many classes a batch mixes when the listing is sorted by class, and what the order costs.

    python -m benchmarks.shuffle_mixing [--classes=1000 --per_class=1300 --batch=256]

What it measures. A synthetic source of ImageNet's shape, `--classes` x `--per_class` images
listed class after class (index i has class i // per_class, as a `folder:` of ImageNet's
`train/<wnid>/` is sorted), whose element is its own index: no file, no decoding. Its epochs
go through the real order of one input pipeline (`data.pretrain.epoch_elements`: the stage
before decoding), cut into batches of `--batch`, in two ways:

    block shuffle      the source without `gather`, as the tfds sources stream (and every
                       source did before the full permutation): blocks of
                       data.order.SHUFFLE_BUFFER consecutive elements permuted, then a shuffle
                       buffer of that size
    full permutation   the source fetched by index, as digits and folders are: a uniform
                       permutation of every index (data.order.permutation)
    ..., paths         the same, each index then fetching a path of ImageNet's form from a
                       table of them, as a folder does (a tensor in host memory); and, for
                       comparison, from the same table as a NumPy array (a constant of the
                       gather's function)

Per epoch: the distinct classes in each full batch (mean, minimum, maximum), against the
exact mean and standard deviation of a uniform draw of `--batch` images without replacement
from the same classes; and the epoch's index stream: its wall and CPU seconds (this process,
all threads), the indices per wall second, and the delay before its first index (the
permutation is computed when an epoch starts; both times include it).
"""

from __future__ import annotations

import dataclasses
import time

from runtime.cli import quiet_tensorflow

quiet_tensorflow()  # the zoo's quiet start: no TensorFlow start-up lines

import numpy as np
import tensorflow as tf
from absl import app, flags

from data import order
from data.pretrain import PretrainSource, epoch_elements

_CLASSES = flags.DEFINE_integer("classes", 1000, "Classes of the listing.", lower_bound=1)
_PER_CLASS = flags.DEFINE_integer("per_class", 1300, "Images per class.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 256, "Images per batch.", lower_bound=1)
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Epochs measured (0, 1, ...).", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "The run's seed.")


def class_sorted_source(classes: int, per_class: int) -> PretrainSource:
    """`classes` x `per_class` elements, class after class; element i is i, fetched by index."""
    n = classes * per_class

    def elements():
        return tf.data.Dataset.zip(tf.data.Dataset.range(n), tf.data.Dataset.range(n))

    return PretrainSource("class-sorted", n, (1, 1, 1), elements, lambda x: x,
                          fixed_size=True, gather=lambda indices: indices)


def with_paths(source: PretrainSource, numpy: bool) -> PretrainSource:
    """The source fetching, for index i, the path of image i of a class-sorted ImageNet."""
    paths = np.asarray([f"/data/imagenet/train/n{c:08d}/n{c:08d}_{i}.JPEG"
                        for c in range(_CLASSES.value) for i in range(_PER_CLASS.value)])
    with tf.device("/cpu:0"):
        table = paths if numpy else tf.constant(paths)
    return dataclasses.replace(source, gather=lambda indices: tf.gather(table, indices))


def uniform_draw(classes: int, per_class: int, draws: int) -> tuple[float, float]:
    """(mean, standard deviation) of the number of distinct classes among `draws` images drawn
    uniformly without replacement from `classes` classes of `per_class` images."""
    n = classes * per_class
    k = np.arange(draws)
    miss_one = np.prod((n - per_class - k) / (n - k))  # a given class is not drawn
    miss_two = np.prod((n - 2 * per_class - k) / (n - k))
    var = (classes * miss_one * (1 - miss_one)
           + classes * (classes - 1) * (miss_two - miss_one ** 2))
    return classes * (1 - miss_one), float(np.sqrt(var))


def measure(source: PretrainSource, epoch: int) -> tuple[np.ndarray, float, float, float]:
    """(distinct classes of each full batch, wall and CPU seconds of the epoch's index stream,
    wall seconds to its first index), the epoch's order (its permutation) computed in each."""
    def stream():
        return epoch_elements(source, _SEED.value)(tf.constant(epoch, tf.int64))

    start = time.perf_counter()
    next(iter(stream()))
    first = time.perf_counter() - start
    # Consumed 4096 at a time in the graph, so that the time is the stream's, not the loop's.
    start, cpu = time.perf_counter(), time.process_time()
    stream().batch(4096).reduce(np.int64(0), lambda count, _: count + 1)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    indices = np.concatenate([index.numpy() for index, _ in stream().batch(1 << 16)])
    batches = indices[:len(indices) // _BATCH.value * _BATCH.value].reshape(-1, _BATCH.value)
    distinct = np.array([len(np.unique(b // _PER_CLASS.value)) for b in batches])
    return distinct, seconds, cpu, first


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    classes, per_class, batch = _CLASSES.value, _PER_CLASS.value, _BATCH.value
    if batch > classes * per_class:
        raise app.UsageError(f"--batch={batch} exceeds the {classes * per_class} images")
    indexed = class_sorted_source(classes, per_class)
    rows = {f"block shuffle ({order.SHUFFLE_BUFFER})": dataclasses.replace(indexed,
                                                                          gather=None),
            "full permutation": indexed,
            "full permutation, paths": with_paths(indexed, numpy=False),
            "..., paths as NumPy constant": with_paths(indexed, numpy=True)}
    mean, sd = uniform_draw(classes, per_class, batch)
    print(f"{classes} classes x {per_class} images listed class after class, batches of "
          f"{batch}, seed {_SEED.value}; a uniform draw holds {mean:.2f} +- {sd:.2f} classes\n")
    head = (f"| {'order':<28} | {'epoch':>5} | {'batches':>7} | {'classes/batch mean':>18} | "
            f"{'min':>4} | {'max':>4} | {'epoch s':>7} | {'CPU s':>5} | {'first index s':>13} | "
            f"{'indices/s':>9} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for name, source in rows.items():
        for epoch in range(_EPOCHS.value):
            distinct, seconds, cpu, first = measure(source, epoch)
            print(f"| {name:<28} | {epoch:>5} | {len(distinct):>7} | "
                  f"{distinct.mean():>18.2f} | {distinct.min():>4} | {distinct.max():>4} | "
                  f"{seconds:>7.2f} | {cpu:>5.2f} | {first:>13.2f} | "
                  f"{source.num_examples / seconds:>9.0f} |")


if __name__ == "__main__":
    app.run(main)
