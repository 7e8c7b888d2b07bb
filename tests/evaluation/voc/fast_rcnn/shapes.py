"""Generated detection data for the tests: drawn shapes on textured backgrounds."""

from __future__ import annotations

import numpy as np

from evaluation.voc.fast_rcnn import boxes as box_ops

SQUARE, DISC = 1, 2  # class indices (1-based; 0 is background)


def shape_image(rng: np.random.Generator, size: tuple[int, int] = (128, 160),
                num_objects: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image of bright squares (class 1) and discs (class 2) on a noisy striped background.

    Returns (image [H, W, 3] uint8, boxes [G, 4] devkit 1-based inclusive, labels [G]).
    The objects do not overlap; each is 36-60 pixels wide.
    """
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width]
    period = rng.uniform(6, 14)
    stripes = 0.5 + 0.5 * np.sin((xx * rng.uniform(-1, 1) + yy) * 2 * np.pi / period)
    image = 60 + 60 * stripes[..., None] * rng.uniform(0.3, 1.0, 3) + rng.normal(0, 12, (
        height, width, 3))
    boxes: list[np.ndarray] = []
    attempts = 0
    while len(boxes) < num_objects:
        side = int(rng.integers(36, 61))
        x1, y1 = int(rng.integers(1, width - side + 2)), int(rng.integers(1, height - side + 2))
        box = np.array([x1, y1, x1 + side - 1, y1 + side - 1])
        attempts += 1
        if boxes and box_ops.iou_matrix(box[None], np.array(boxes)).max() > 0:
            if attempts % 100 == 0:  # the first objects may leave no room: start over
                boxes = []
            continue
        boxes.append(box)
    labels = [SQUARE if i % 2 == 0 else DISC for i in range(num_objects)]
    for (x1, y1, x2, y2), label in zip(boxes, labels, strict=True):
        colour = rng.uniform(150, 255, 3)  # the same for both classes: shape tells them apart
        inside = (xx >= x1 - 1) & (xx <= x2 - 1) & (yy >= y1 - 1) & (yy <= y2 - 1)
        if label == DISC:
            cx, cy, radius = (x1 + x2) / 2 - 1, (y1 + y2) / 2 - 1, (x2 - x1 + 1) / 2
            inside &= (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
        image[inside] = colour + rng.normal(0, 12, (int(inside.sum()), 3))
    return (np.clip(image, 0, 255).astype(np.uint8), np.array(boxes, np.int64),
            np.array(labels, np.int64))


def jittered_proposals(rng: np.random.Generator, gt: np.ndarray, height: int, width: int,
                       per_box: int = 40, background: int = 120) -> np.ndarray:
    """Proposals around each ground-truth box (shifted and rescaled by up to ~30%) and
    random boxes anywhere, clipped to the image: [P, 4] int32 devkit boxes."""
    out = []
    for x1, y1, x2, y2 in gt:
        w, h = x2 - x1 + 1, y2 - y1 + 1
        dx, dy = rng.uniform(-0.3, 0.3, (2, per_box))
        sw, sh = np.exp(rng.uniform(-0.3, 0.3, (2, per_box)))
        cx, cy = x1 + w / 2 + dx * w, y1 + h / 2 + dy * h
        out.append(np.stack([cx - sw * w / 2, cy - sh * h / 2, cx + sw * w / 2 - 1,
                             cy + sh * h / 2 - 1], axis=1))
    x1 = rng.uniform(1, width - 16, background)
    y1 = rng.uniform(1, height - 16, background)
    out.append(np.stack([x1, y1, x1 + rng.uniform(16, width / 2, background),
                         y1 + rng.uniform(16, height / 2, background)], axis=1))
    boxes = np.rint(box_ops.clip_boxes(np.concatenate(out), height, width))
    return boxes.astype(np.int32)
