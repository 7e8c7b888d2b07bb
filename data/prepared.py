"""tfds datasets as prepared in a data_dir: the one place where a missing one is found, named
with the command that prepares it, or prepared (`fashion_mnist` from its Debian package,
offline; any dataset by tfds itself when asked to).

Labelled splits (`data.labelled`), pretraining streams (`data.pretrain`) and the examples a
figure draws (`examples_at`) all read through `tfds_split`; `at_positions` keeps the examples
at given positions of a split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data import DataError, fashion_mnist


def missing_message(name: str, builder, data_dir: str | None, manual_dir: str | None) -> str:
    """The one line for a tfds dataset that is not prepared in data_dir."""
    suffix = f" --data_dir={data_dir}" if data_dir else ""
    if name == fashion_mnist.NAME:
        return fashion_mnist.missing_message(data_dir or builder.data_dir_root)
    if name == "imagenet2012":
        where = manual_dir or "<manual_dir>"
        return (f"dataset imagenet2012 is not prepared in {builder.data_dir}: put "
                f"ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {where} and run "
                f"`tfds build imagenet2012 --manual_dir={where}{suffix}`")
    return (f"dataset {name} is not prepared in {builder.data_dir}: run `tfds build "
            f"{name}{suffix}` on a machine with network access")


def tfds_split(name: str, split: str, data_dir: str | None = None,
               manual_dir: str | None = None, decoders: dict | None = None,
               prepare: bool = False) -> tuple[tfds.core.DatasetBuilder, tf.data.Dataset]:
    """(builder, the split as read by `builder.as_dataset` in its fixed order).

    When the dataset is not prepared in `data_dir` (None: the tfds default): `fashion_mnist`
    is prepared there from the Debian package if it is installed (`data.fashion_mnist`),
    another dataset by tfds (downloading; ImageNet reads `manual_dir`) if `prepare`; else
    DataError names what to run.
    """
    builder = tfds.builder(name, data_dir=data_dir)

    def read():
        return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)

    try:
        return builder, read()
    except AssertionError:  # tfds' way of saying that the data was never generated
        pass
    if name == fashion_mnist.NAME and fashion_mnist.debian_dir():
        fashion_mnist.prepare(builder, fashion_mnist.debian_dir())
    elif prepare:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    else:
        raise DataError(missing_message(name, builder, data_dir, manual_dir))
    return builder, read()


def at_positions(ds: tf.data.Dataset, positions) -> tf.data.Dataset:
    """The elements of `ds` at `positions` (0-based, in the order of `ds`), each once, in
    increasing position order. `ds` is read up to the last of them and no further; what is
    mapped after this sees only the kept elements."""
    keep = np.unique(np.asarray(positions, dtype=np.int64))
    size = int(keep[-1]) + 1 if len(keep) else 0
    mask = np.zeros(size, dtype=bool)
    mask[keep] = True
    mask = tf.constant(mask)

    def kept(i, example):  # named functions: AutoGraph warns of two lambdas on one line
        return mask[i]

    def example_only(i, example):
        return example

    return ds.take(size).enumerate().filter(kept).map(example_only)


@dataclass(frozen=True)
class Examples:
    """Examples of a tfds split by position.

    Attributes:
      images: position -> uint8 [h, w, c], as tfds decodes the `image` feature.
      labels: position -> int `label` (empty when the dataset has no integer `label`).
      names: the class names of tfds's info (a ClassLabel without names gives "0", "1", ...),
        or None when `label` is not a ClassLabel.
    """

    images: dict[int, np.ndarray]
    labels: dict[int, int]
    names: tuple[str, ...] | None


def examples_at(name: str, split: str, positions, data_dir: str | None = None,
                manual_dir: str | None = None) -> Examples:
    """The `image` and `label` of the examples at `positions` (as `at_positions`) of the tfds
    split `name`/`split` (a tfds split string; a slice such as "test[:500]" counts from its
    start), read through `tfds_split` in ONE pass that stops at the last position. Only the
    kept images are decoded.

    Raises DataError when the dataset is unknown to tfds, not prepared (`tfds_split`), has no
    such split, no `image` feature, or fewer examples than a position needs.
    """
    keep = np.unique(np.asarray(positions, dtype=np.int64)).tolist()
    if keep and keep[0] < 0:
        raise ValueError(f"positions must be >= 0; got {keep[0]}")
    try:
        builder, ds = tfds_split(name, split, data_dir, manual_dir,
                                 decoders={"image": tfds.decode.SkipDecoding()})
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"tfds has no dataset {name!r}") from None
    except DataError:
        raise
    except ValueError as err:  # tfds' word for an unknown or malformed split
        raise DataError(f"dataset {name} split {split!r} cannot be read: "
                        f"{str(err).splitlines()[0]}") from None
    features = builder.info.features
    if "image" not in features:
        raise DataError(f"dataset {name} has no 'image' feature to draw")
    decode = features["image"].decode_example
    has_label = "label" in ds.element_spec and ds.element_spec["label"].dtype.is_integer
    ds = at_positions(ds, keep).map(
        lambda ex: (decode(ex["image"]), ex["label"] if has_label else tf.constant(-1, tf.int64)))
    images, labels = {}, {}
    for position, (image, label) in zip(keep, ds.as_numpy_iterator(), strict=False):
        images[position] = image
        if has_label:
            labels[position] = int(label)
    if len(images) < len(keep):
        raise DataError(f"dataset {name} split {split!r} ends before position "
                        f"{keep[len(images)]}")
    label = features["label"] if has_label else None
    names = tuple(label.names) if isinstance(label, tfds.features.ClassLabel) else None
    return Examples(images, labels, names)
