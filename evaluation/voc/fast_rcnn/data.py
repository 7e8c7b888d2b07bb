"""Training and test inputs of Fast R-CNN (Girshick 2015, Sec. 2.3 and 3).

Training mini-batches hold `images_per_batch` (2) images and the RoIs of `sampler.sample_rois`
(up to 128 per image). Each image is scaled by `model.scale_factor` to a shorter side drawn
uniformly from `scales` (600 by default; several for multi-scale training) with the longer
side at most `max_size` (1000), mirrored with probability 1/2 (boxes and proposals with it),
and zero-padded at the bottom and right to the largest image of the batch. Pixels enter the
network as uint8 * pixel_scale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from data import voc as voc_data
from evaluation.voc.fast_rcnn import boxes as box_ops
from evaluation.voc.fast_rcnn.model import resized_shape, to_input_pixels
from evaluation.voc.fast_rcnn.sampler import sample_rois


@dataclass(frozen=True)
class DetectionImage:
    """One image with its non-difficult ground truth (labels 1..20) and its proposals."""

    image_id: str
    image: np.ndarray  # [H, W, 3] uint8
    gt_boxes: np.ndarray  # [G, 4] devkit boxes
    gt_labels: np.ndarray  # [G] in 1..20
    proposals: np.ndarray  # [P, 4] devkit boxes


def detection_image(example: Mapping, proposals: Callable[[str], np.ndarray]
                    ) -> DetectionImage:
    """A tfds voc example (NumPy) -> DetectionImage; difficult objects are left out, as Fast
    R-CNN trains without them."""
    image = np.asarray(example["image"])
    objects = example["objects"]
    boxes = voc_data.devkit_boxes(objects["bbox"], image.shape[0], image.shape[1])
    keep = ~np.asarray(objects["is_difficult"], dtype=bool).reshape(-1)
    labels = np.asarray(objects["label"], dtype=np.int64).reshape(-1) + 1
    image_id = voc_data.image_id(example)
    return DetectionImage(image_id, image, boxes[keep], labels[keep], proposals(image_id))


def resize_image(image: np.ndarray, target: int, max_size: int,
                 pixel_scale: float) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [H', W', 3] (bilinear, `model.resized_shape`) * pixel_scale."""
    height, width = image.shape[:2]
    size = resized_shape(height, width, target, max_size)
    resized = tf.image.resize(tf.convert_to_tensor(image, tf.float32), size, "bilinear")
    return resized.numpy() * np.float32(pixel_scale)


def make_batch(items: Sequence[DetectionImage], rng: np.random.Generator,
               scales: Sequence[int] = (600,), max_size: int = 1000, flip: bool = True,
               pixel_scale: float = 1.0 / 255.0, **sampler_args) -> dict[str, np.ndarray] | None:
    """One training mini-batch, or None when no image of `items` yields a RoI.

    Returns {"images": [B, H, W, 3] float32, "rois": [R, 4] float32 (input pixels, see
    `model.to_input_pixels`), "roi_indices": [R] int32, "labels": [R] int32, "targets":
    [R, 4] float32}, `sampler_args` going to `sampler.sample_rois`.
    """
    images, rois, indices, labels, targets = [], [], [], [], []
    for item in items:
        height, width = item.image.shape[:2]
        image, gt, proposals = item.image, item.gt_boxes, item.proposals
        if flip and rng.random() < 0.5:
            image = image[:, ::-1]
            gt = box_ops.flip_boxes(gt, width) if len(gt) else gt
            proposals = box_ops.flip_boxes(proposals, width)
        sample = sample_rois(proposals, gt, item.gt_labels, rng, **sampler_args)
        if not len(sample.labels):
            continue
        target = int(scales[rng.integers(len(scales))])
        resized = resize_image(image, target, max_size, pixel_scale)
        rois.append(to_input_pixels(sample.boxes, height, width, *resized.shape[:2]))
        indices.append(np.full(len(sample.labels), len(images), np.int32))
        images.append(resized)
        labels.append(sample.labels.astype(np.int32))
        targets.append(sample.targets.astype(np.float32))
    if not images:
        return None
    height = max(im.shape[0] for im in images)
    width = max(im.shape[1] for im in images)
    batch = np.zeros((len(images), height, width, 3), np.float32)
    for i, im in enumerate(images):
        batch[i, :im.shape[0], :im.shape[1]] = im
    return {"images": batch, "rois": np.concatenate(rois), "roi_indices": np.concatenate(indices),
            "labels": np.concatenate(labels), "targets": np.concatenate(targets)}


def training_batches(items: Iterable[DetectionImage], rng: np.random.Generator,
                     images_per_batch: int = 2, **batch_args) -> Iterator[dict[str, np.ndarray]]:
    """Group `items` into mini-batches (`make_batch`), skipping images without any RoI."""
    group: list[DetectionImage] = []
    for item in items:
        group.append(item)
        if len(group) == images_per_batch:
            batch = make_batch(group, rng, **batch_args)
            group = []
            if batch is not None:
                yield batch


BATCH_SIGNATURE = {
    "images": tf.TensorSpec([None, None, None, 3], tf.float32),
    "rois": tf.TensorSpec([None, 4], tf.float32),
    "roi_indices": tf.TensorSpec([None], tf.int32),
    "labels": tf.TensorSpec([None], tf.int32),
    "targets": tf.TensorSpec([None, 4], tf.float32),
}
"""The tf.TensorSpec of every field of a training mini-batch."""
