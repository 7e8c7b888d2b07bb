"""Fast R-CNN test-time detection (Girshick 2015, Sec. 3): scoring and per-class NMS.

For a test image at one scale (shorter side 600, longer at most 1000), every proposal gets
class probabilities softmax(cls_logits) [P, 21] and, per class, the box `boxes.decode`
(proposal, bbox_deltas[4k:4k+4]) clipped to the image. Then, for each class k >= 1, the boxes
with probability > score_threshold (0.05) go through greedy NMS at IoU 0.3, and of all the
classes' survivors the max_per_image (100) highest-scoring are kept, as the released
Fast R-CNN test code does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from evaluation.voc.fast_rcnn import boxes as box_ops
from evaluation.voc.fast_rcnn.data import resize_image
from evaluation.voc.fast_rcnn.model import to_input_pixels


def score_proposals(net_fn: Callable[[dict], dict], image: np.ndarray, proposals: np.ndarray,
                    scale: int = 600, max_size: int = 1000, pixel_scale: float = 1.0 / 255.0,
                    chunk: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities [P, K] and clipped per-class boxes [P, 4K] of one image.

    Args:
      net_fn: inputs -> outputs of `model.build_detector` in inference mode.
      image: [H, W, 3] uint8.
      proposals: [P, 4] devkit boxes.
      chunk: RoIs per call of the fully-connected head (bounds the memory).
    """
    height, width = image.shape[:2]
    resized = resize_image(image, scale, max_size, pixel_scale)
    rois = to_input_pixels(proposals, height, width, *resized.shape[:2])
    images = tf.constant(resized[None])
    logits, deltas = [], []
    for start in range(0, len(rois), chunk):
        part = rois[start:start + chunk]
        out = net_fn({"images": images, "rois": tf.constant(part),
                      "roi_indices": tf.zeros([len(part)], tf.int32)})
        logits.append(np.asarray(out["cls_logits"]))
        deltas.append(np.asarray(out["bbox_deltas"]))
    logits, deltas = np.concatenate(logits), np.concatenate(deltas)
    probs = tf.nn.softmax(logits.astype(np.float64), axis=-1).numpy()
    boxes = box_ops.clip_boxes(box_ops.decode(proposals, deltas), height, width)
    return probs, boxes


def postprocess(probs: np.ndarray, boxes: np.ndarray, score_threshold: float = 0.05,
                nms_threshold: float = 0.3, max_per_image: int = 100
                ) -> list[tuple[int, float, np.ndarray]]:
    """Detections [(class in 1..K-1, score, box [4])] of one image, best first.

    Args:
      probs: [P, K] class probabilities (column 0: background).
      boxes: [P, 4K] per-class boxes.
    """
    found: list[tuple[int, float, np.ndarray]] = []
    for k in range(1, probs.shape[1]):
        above = np.flatnonzero(probs[:, k] > score_threshold)
        if not above.size:
            continue
        class_boxes = boxes[above, 4 * k:4 * k + 4]
        keep = box_ops.nms(class_boxes, probs[above, k], nms_threshold)
        found.extend((k, float(probs[above[i], k]), class_boxes[i]) for i in keep)
    found.sort(key=lambda d: -d[1])
    return found[:max_per_image]
