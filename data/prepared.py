"""tfds datasets as prepared in a data_dir: the one place where a missing one is found, named
with the command that prepares it, or prepared (`fashion_mnist` from its Debian package,
offline; any dataset by tfds itself when asked to).

Labelled splits (`data.labelled`) and pretraining streams (`data.pretrain`) both read through
`tfds_split`.
"""

from __future__ import annotations

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
