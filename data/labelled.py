"""Labelled datasets for transfer: `(image, label)` pairs, resized to the model input.

Datasets (the names of pretraining):

    name           train                         test                     classes
    digits         1198 of sklearn's 8x8 digits  the other 599            10   (embedded)
    mnist          tfds `train` (60000)          tfds `test` (10000)      10
    fashion_mnist  tfds `train` (60000)          tfds `test` (10000)      10   (data.fashion_mnist)
    cifar10        tfds `train` (50000)          tfds `test` (10000)      10
    stl10          tfds `train` (5000)           tfds `test` (8000)       10
    imagenet2012   tfds `train` (1281167)        tfds `validation` (50000) 1000

`digits` is scikit-learn's bundled copy of the UCI handwritten digits (`data.digits`), so it
needs no network.

STL-10's ten predefined training folds (1000 images each, Coates et al. 2011) are listed in
`fold_indices.txt` of the original binary archive, as 0-based positions in `train_X.bin`. tfds
does not keep that order, so a fold is read from the binary files themselves (`stl10_dir`, or
`<manual_dir>/stl10_binary`), decoded exactly as the tfds builder does.

Every image is float32 [H, W, C] in [0, 1], mapped to a model's input shape by the rule of
`data.images.resize_to_input` (ImageNet images are centre-cropped to a square first).

All image reads go through `load`, and all label reads through `load_labels`; protocols rely
on that to show, in tests, that a test split is not read before the final evaluation.
Nothing here downloads: tfds datasets must be prepared in `data_dir` (ImageNet from
`manual_dir`) unless `LabelledSource.prepare` is set; `fashion_mnist` is prepared offline from
the Debian package `dataset-fashion-mnist` when it is installed (`data.prepared`);
`check_available` says at once, in one line naming the `tfds build` command, when a split is
not prepared. `train_stream` gives the augmented training batches of fine-tuning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data import LABELLED_DATASETS, DataError, digits, prepared
from data.augment import translate_and_flip
from data.images import resize_to_input
from runtime.errors import MissingInput

SPLITS = ("train", "test")
NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10, "stl10": 10,
               "imagenet2012": 1000}
# The split each protocol tests on: ImageNet's labelled test set is its validation set.
TFDS_SPLIT = {
    "mnist": {"train": "train", "test": "test"},
    "fashion_mnist": {"train": "train", "test": "test"},
    "cifar10": {"train": "train", "test": "test"},
    "stl10": {"train": "train", "test": "test"},
    "imagenet2012": {"train": "train", "test": "validation"},
}
STL10_FOLDS = 10
STL10_SHAPE = (96, 96, 3)


@dataclass(frozen=True)
class LabelledSource:
    """Where a dataset comes from.

    Attributes:
      name: one of LABELLED_DATASETS.
      data_dir: tfds data directory (None: the tfds default).
      manual_dir: tfds manual directory (ImageNet's tars; STL-10's `stl10_binary` folder).
      stl10_dir: the STL-10 `stl10_binary` folder (train_X.bin, train_y.bin, test_X.bin,
        test_y.bin, fold_indices.txt); when set, STL-10 is read from it instead of tfds.
      prepare: let tfds build a missing dataset (downloads; ImageNet reads manual_dir).
    """

    name: str
    data_dir: str | None = None
    manual_dir: str | None = None
    stl10_dir: str | None = None
    prepare: bool = False

    def __post_init__(self):
        if self.name not in LABELLED_DATASETS:
            raise ValueError(f"unknown dataset {self.name!r}; choose one of "
                             f"{', '.join(LABELLED_DATASETS)}")

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.name]


def as_source(dataset: str | LabelledSource) -> LabelledSource:
    """A LabelledSource from a dataset name or a LabelledSource."""
    return dataset if isinstance(dataset, LabelledSource) else LabelledSource(dataset)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


# --------------------------------------------------------------------------------------------
# STL-10 binary files (for the predefined folds)


def stl10_directory(source: LabelledSource) -> str | None:
    """The `stl10_binary` folder of a Source, or None when neither stl10_dir nor manual_dir has
    one."""
    if source.stl10_dir:
        return source.stl10_dir
    if source.manual_dir:
        candidate = os.path.join(source.manual_dir, "stl10_binary")
        if tf.io.gfile.exists(os.path.join(candidate, "fold_indices.txt")):
            return candidate
    return None


def stl10_binary_arrays(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split of the STL-10 binary files: images uint8 [N, 96, 96, 3], labels int64 [N] in 0..9.

    The files store each image as 3 x 96 x 96 bytes, column-major within a channel, and labels
    1..10; the transpose (0, 3, 2, 1) and the shift by one are the tfds builder's.
    """
    _check_split(split)
    paths = [os.path.join(directory, f"{split}_{part}.bin") for part in ("X", "y")]
    for path in paths:
        if not tf.io.gfile.exists(path):
            raise MissingInput(f"STL-10 file {path} not found")
    with tf.io.gfile.GFile(paths[0], "rb") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8)
    images = images.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
    with tf.io.gfile.GFile(paths[1], "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8).astype(np.int64) - 1
    if len(images) != len(labels):
        raise DataError(f"{directory}: {len(images)} images but {len(labels)} labels in {split}")
    return images, labels


def stl10_folds(directory: str) -> list[np.ndarray]:
    """The 10 predefined training folds: 0-based positions in `train_X.bin`, one array each."""
    path = os.path.join(directory, "fold_indices.txt")
    if not tf.io.gfile.exists(path):
        raise MissingInput(f"STL-10 fold file {path} not found")
    with tf.io.gfile.GFile(path, "r") as f:
        lines = [line.split() for line in f.read().splitlines() if line.strip()]
    folds = [np.asarray([int(v) for v in line], dtype=np.int64) for line in lines]
    if len(folds) != STL10_FOLDS:
        raise DataError(f"{path} lists {len(folds)} folds; expected {STL10_FOLDS}")
    return folds


# --------------------------------------------------------------------------------------------
# tfds


def _tfds_dataset(source: LabelledSource, split: str, skip_image: bool) -> tf.data.Dataset:
    decoders = {"image": tfds.decode.SkipDecoding()} if skip_image else None
    # a fixed order: label draws index into it
    return prepared.tfds_split(source.name, TFDS_SPLIT[source.name][split], source.data_dir,
                               source.manual_dir, decoders, prepare=source.prepare)[1]


def check_available(dataset: str | LabelledSource, splits: tuple[str, ...] = SPLITS) -> None:
    """Raise DataError (data.prepared) now, before any training, when a split a run will read
    is not prepared; nothing is read or downloaded. The embedded digits, STL-10 from its
    binary folder and a source that may prepare itself pass."""
    source = as_source(dataset)
    if source.name == "digits" or _use_stl10_binary(source) or source.prepare:
        return
    for split in splits:
        _check_split(split)
        _tfds_dataset(source, split, skip_image=True)


def _use_stl10_binary(source: LabelledSource) -> bool:
    return source.name == "stl10" and source.stl10_dir is not None


# --------------------------------------------------------------------------------------------
# public readers


def load_labels(dataset: str | LabelledSource, split: str) -> np.ndarray:
    """The labels int64 [N] of a split, in the order `load` yields its images.

    tfds images are not decoded for this.
    """
    source = as_source(dataset)
    _check_split(split)
    if source.name == "digits":
        return digits.split_arrays(split)[1]
    if _use_stl10_binary(source):
        return stl10_binary_arrays(source.stl10_dir, split)[1]
    ds = _tfds_dataset(source, split, skip_image=True).map(lambda ex: ex["label"])
    return np.fromiter(ds.as_numpy_iterator(), dtype=np.int64)


def load(dataset: str | LabelledSource, split: str, input_shape: tuple[int, int, int],
         indices: np.ndarray | None = None) -> tf.data.Dataset:
    """A split as an unbatched tf.data.Dataset of (image float32 [H, W, C] in [0, 1], label
    int64), with (H, W, C) = `input_shape`.

    `indices` (positions in the split's fixed order, as in `load_labels`) keeps only those
    examples, in increasing position order.
    """
    source = as_source(dataset)
    _check_split(split)
    input_shape = tuple(int(d) for d in input_shape)
    keep = None if indices is None else np.unique(np.asarray(indices, dtype=np.int64))

    if source.name == "digits" or _use_stl10_binary(source):
        if source.name == "digits":
            images, labels = digits.split_arrays(split)
        else:
            images, labels = stl10_binary_arrays(source.stl10_dir, split)
        if keep is not None:
            keep = keep[keep < len(labels)]
            images, labels = images[keep], labels[keep]
        scale = 255.0 if images.dtype == np.uint8 else 1.0
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        return ds.map(lambda x, y: (resize_to_input(tf.cast(x, tf.float32) / scale, input_shape),
                                    y), num_parallel_calls=tf.data.AUTOTUNE)

    crop = source.name == "imagenet2012"
    ds = _tfds_dataset(source, split, skip_image=False)
    if keep is not None:
        ds = prepared.at_positions(ds, keep)

    def convert(example):
        image = tf.cast(example["image"], tf.float32) / 255.0
        return resize_to_input(image, input_shape, center_crop=crop), tf.cast(example["label"],
                                                                               tf.int64)

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def load_arrays(dataset: str | LabelledSource, split: str, input_shape: tuple[int, int, int],
                indices: np.ndarray | None = None, batch_size: int = 256
                ) -> tuple[np.ndarray, np.ndarray]:
    """`load` gathered in memory: images float32 [N, H, W, C], labels int64 [N]."""
    images, labels = [], []
    for x, y in load(dataset, split, input_shape, indices).batch(batch_size):
        images.append(x.numpy())
        labels.append(y.numpy())
    if not images:
        return np.zeros((0, *input_shape), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(images), np.concatenate(labels)


# --------------------------------------------------------------------------------------------
# label draws and splits


class LabelsPerClassError(DataError):
    """More labels per class were asked for than a class has."""


def per_class_draw(labels: np.ndarray, k: int, rng: np.random.Generator,
                   num_classes: int | None = None, what: str = "the split") -> np.ndarray:
    """k positions per class, drawn without replacement; sorted int64 [k * classes].

    Raises LabelsPerClassError (a DataError) naming the smallest class when some class has
    fewer than k examples.
    """
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if k < 1:
        raise ValueError(f"labels_per_class must be >= 1; got {k}")
    counts = np.bincount(labels, minlength=num_classes)
    smallest = int(np.argmin(counts))
    if counts[smallest] < k:
        raise LabelsPerClassError(f"{k} labels per class is more than class {smallest} of {what} "
                                  f"has ({counts[smallest]} examples)")
    chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
              for c in range(num_classes)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def split_validation(labels: np.ndarray, fraction: float, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Carve a stratified validation set from labelled examples.

    Returns (fit, validation): positions into `labels`, sorted. Each class with n >= 2 examples
    gives max(1, round(fraction * n)) of them (at most n - 1) to validation; with fraction 0 or
    classes of one example, validation is empty.
    """
    labels = np.asarray(labels)
    fit, val = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n = len(members)
        n_val = 0 if (fraction <= 0 or n < 2) else min(n - 1, max(1, round(fraction * n)))
        val.append(members[:n_val])
        fit.append(members[n_val:])
    return (np.sort(np.concatenate(fit)).astype(np.int64),
            np.sort(np.concatenate(val)).astype(np.int64))


def train_stream(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, epochs: int,
                 translate: int, mirror: bool):
    """The augmented (images, labels) batches of epochs 1..epochs, one after the other: epoch
    e visits the examples in an order fixed by (seed, e), in ceil(N / batch_size) batches, each
    image moved by `data.pretrain.translate_and_flip` seeded by (seed, e, index)."""

    orders = np.stack([np.random.default_rng([seed, 2, epoch]).permutation(len(y))
                       for epoch in range(1, epochs + 1)]).astype(np.int64)
    images, labels, orders = tf.constant(x), tf.constant(y), tf.constant(orders)

    def one_epoch(epoch):
        def apply(index):
            stateless = tf.stack([tf.constant(seed * 100_003, tf.int64) + epoch, index])
            image = translate_and_flip(tf.gather(images, index), translate, mirror, stateless,
                                       stateless + 1)
            return image, tf.gather(labels, index)

        order = tf.data.Dataset.from_tensor_slices(orders[epoch - 1])
        return order.map(apply, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)

    epochs_ds = tf.data.Dataset.range(1, epochs + 1)
    return epochs_ds.flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)
