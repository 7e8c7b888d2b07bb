"""PASCAL VOC 2007 from tfds `voc/2007`, in the devkit's terms.

Splits (the VOC 2007 protocol of NAT Table 4 and the voc-classification code):
    trainval = tfds "train+validation"   5011 images   (training)
    test     = tfds "test"               4952 images   (evaluation)

Classification labels (devkit `VOCevalcls` ground truth), one int per class in `VOC_CLASSES`
order:
     1  the image holds a non-difficult object of the class   (in `labels_no_difficult`)
     0  it holds only difficult objects of the class          (in `labels` only: ignored)
    -1  it holds no object of the class

Boxes: tfds stores `bbox` = (ymin / H, xmin / W, ymax / H, xmax / W) with the devkit's 1-based
inclusive integer corners divided by the image size, in float32. `devkit_boxes` multiplies back
and rounds, which recovers the integers exactly (the float32 error is far below 0.5 pixel for
any VOC size), giving the (x1, y1, x2, y2) boxes `evaluation.voc.metrics.detection_ap` expects.

Nothing downloads unless asked (`download=True`); without prepared data the loader raises
`VocDataNotFoundError`, whose one-line message names the tfds command that prepares it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from urllib.parse import urlparse

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.object_detection import voc

from runtime.errors import MissingInput

TFDS_NAME = "voc/2007"
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
"""The 20 classes in devkit (and tfds ClassLabel) order."""
NUM_CLASSES = len(VOC_CLASSES)
SPLITS: dict[str, str] = {"trainval": "train+validation", "test": "test"}
"""Protocol split name -> tfds split expression."""
NUM_IMAGES: dict[str, int] = {"trainval": 5011, "test": 4952}


class VocDataNotFoundError(MissingInput):
    """voc/2007 is not prepared in the data directory."""


def classification_labels(labels: Iterable[int], labels_no_difficult: Iterable[int],
                          num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Devkit classification labels [num_classes] int8: 1, 0 (difficult only) or -1.

    Args:
      labels: class indices of every object in the image (tfds `labels`).
      labels_no_difficult: class indices of its non-difficult objects (`labels_no_difficult`).
    """
    out = np.full(num_classes, -1, dtype=np.int8)
    out[np.asarray(list(labels), dtype=np.int64)] = 0
    out[np.asarray(list(labels_no_difficult), dtype=np.int64)] = 1
    return out


def tf_classification_labels(labels: tf.Tensor, labels_no_difficult: tf.Tensor,
                             num_classes: int = NUM_CLASSES) -> tf.Tensor:
    """`classification_labels` in the graph: [L], [L'] int -> [num_classes] int32."""
    present = tf.reduce_sum(tf.one_hot(labels, num_classes, dtype=tf.int32), axis=0)
    clean = tf.reduce_sum(tf.one_hot(labels_no_difficult, num_classes, dtype=tf.int32), axis=0)
    return tf.where(clean > 0, 1, tf.where(present > 0, 0, -1))


def devkit_boxes(bbox, height: int, width: int) -> np.ndarray:
    """tfds normalised boxes -> devkit boxes.

    Args:
      bbox: [M, 4] (ymin, xmin, ymax, xmax) divided by (H, W, H, W).
      height, width: the image size in pixels.

    Returns:
      [M, 4] int64 (x1, y1, x2, y2): 1-based inclusive pixel corners, round(bbox * size).
    """
    bbox = np.asarray(bbox, dtype=np.float64).reshape(-1, 4)
    ymin, xmin, ymax, xmax = bbox.T
    return np.rint(np.stack([xmin * width, ymin * height, xmax * width, ymax * height],
                            axis=1)).astype(np.int64)


def _image_id(filename: tf.Tensor) -> tf.Tensor:
    return tf.strings.regex_replace(filename, r"\.jpg$", "")


def image_id(example: Mapping) -> str:
    """The devkit id ("000005") of a tfds voc example (NumPy)."""
    filename = example["image/filename"]
    filename = filename.decode() if isinstance(filename, bytes) else str(filename)
    return filename.removesuffix(".jpg")


def load_split(split: str, data_dir: str | None = None, manual_dir: str | None = None,
               download: bool = False, shuffle_files: bool = False) -> tf.data.Dataset:
    """The raw tfds examples of a protocol split ("trainval" or "test").

    Args:
      split: a key of SPLITS.
      data_dir: the tfds data directory (None: tfds's default, ~/tensorflow_datasets).
      manual_dir: where already downloaded archives are, when `download` prepares the data.
      download: prepare the data first (downloads the archives unless `manual_dir` has them).
      shuffle_files: shuffle the tfds shards (training).

    Returns:
      The tfds voc/2007 examples (image, image/filename, objects, labels, labels_no_difficult).

    Raises:
      ValueError: unknown split.
      VocDataNotFoundError: the data is not prepared and `download` is False.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown VOC split {split!r}; choose one of {', '.join(SPLITS)}")
    builder = tfds.builder(TFDS_NAME, data_dir=data_dir)
    if download and not builder.is_prepared():
        if not manual_dir:
            check_reachable(_download_host(), TFDS_NAME, data_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    try:
        return builder.as_dataset(split=SPLITS[split], shuffle_files=shuffle_files)
    except (AssertionError, FileNotFoundError, tf.errors.NotFoundError):
        where = data_dir or "the default tfds data_dir"
        flag = f" --data_dir={data_dir}" if data_dir else ""
        raise VocDataNotFoundError(
            f"PASCAL VOC 2007 ({TFDS_NAME}) is not prepared in {where}: run "
            f"`tfds build {TFDS_NAME}{flag}` first"
        ) from None


def _download_host() -> str:
    """The host tfds downloads the VOC archives from."""
    return urlparse(getattr(voc, "_VOC_DATA_URL", "http://host.robots.ox.ac.uk/")).hostname


def check_reachable(host: str, name: str, data_dir: str | None, timeout: float = 5.0) -> None:
    """Raise VocDataNotFoundError at once (and before anything is written) when `host` cannot
    be reached, instead of letting a download retry for minutes without a network."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        flag = f" --data_dir={data_dir}" if data_dir else ""
        raise VocDataNotFoundError(
            f"cannot download {name}: {host} is unreachable ({error.strerror or error}); run "
            f"`tfds build {name}{flag}` on a machine with network access, or put the archives "
            "in --manual_dir") from None


def classification_examples(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """tfds examples -> {"image": uint8 [H, W, 3], "labels": int32 [20], "image_id": string}."""

    def convert(example):
        return {
            "image": example["image"],
            "labels": tf_classification_labels(example["labels"],
                                               example["labels_no_difficult"]),
            "image_id": _image_id(example["image/filename"]),
        }

    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def load_classification(split: str, data_dir: str | None = None,
                        manual_dir: str | None = None, download: bool = False,
                        shuffle_files: bool = False) -> tf.data.Dataset:
    """`classification_examples(load_split(...))`: images, devkit labels and image ids."""
    return classification_examples(
        load_split(split, data_dir, manual_dir, download, shuffle_files))


def detection_ground_truth(
    examples: Iterable[Mapping],
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per-class devkit ground truth for `evaluation.voc.metrics.detection_ap`.

    Args:
      examples: tfds voc examples as NumPy (e.g. `tfds.as_numpy(load_split("test"))`).

    Returns:
      {class name: {image_id: (boxes [M, 4] int64 (x1, y1, x2, y2), difficult [M] bool)}},
      with every image present under every class (M = 0 where the class is absent).
    """
    truth: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {c: {} for c in VOC_CLASSES}
    for example in examples:
        key = image_id(example)
        height, width = np.shape(example["image"])[:2]
        objects = example["objects"]
        boxes = devkit_boxes(objects["bbox"], height, width)
        labels = np.asarray(objects["label"], dtype=np.int64).reshape(-1)
        difficult = np.asarray(objects["is_difficult"], dtype=bool).reshape(-1)
        for index, name in enumerate(VOC_CLASSES):
            mine = labels == index
            truth[name][key] = (boxes[mine], difficult[mine])
    return truth
