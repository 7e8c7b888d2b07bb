"""The whole Fast R-CNN pipeline learns: generated shapes are detected with AP >= 0.9.

Four generated 128 x 160 images, each with a square (class 1) and a disc (class 2) of
random bright colours on a striped, noisy background, and proposals jittered around the
objects plus random boxes. A randomly initialised detector (AlexNet convs, fc6/fc7 narrowed
to 128 units for CPU speed) is trained for 150 steps at a shorter side of 128 with the
binary's training step (sampler, flips, smooth-L1 targets, SGD), then tested on the same
images through `inference` (softmax, box decoding, NMS) and scored with the devkit AP.
"""

from __future__ import annotations

import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from evaluation.voc import metrics as voc_metrics
from evaluation.voc.detection_lib import make_train_step
from evaluation.voc.fast_rcnn import data as det_data
from evaluation.voc.fast_rcnn import inference
from evaluation.voc.fast_rcnn import model as det_model
from tests.helpers import DISC, SQUARE, jittered_proposals, shape_image

SCALE = 128
STEPS = 150


@pytest.mark.slow
def test_detector_learns_generated_shapes():
    rng = np.random.default_rng(0)
    items = []
    for i in range(4):
        image, boxes, labels = shape_image(rng)
        items.append(det_data.DetectionImage(f"{i:06d}", image, boxes, labels,
                                             jittered_proposals(rng, boxes, *image.shape[:2])))
    keras.utils.set_random_seed(0)
    net = det_model.build_detector("rgb", dropout=0.0, fc_units=128)
    variables = det_model.set_frozen(net, "none")
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    optimizer.build(variables)
    step = make_train_step(net, optimizer, variables, weight_decay=5e-4)

    start = time.time()
    losses = []
    for s in range(STEPS):
        group = [items[(2 * s) % 4], items[(2 * s + 1) % 4]]
        batch = det_data.make_batch(group, rng, scales=(SCALE,), max_size=2 * SCALE,
                                    num_rois=64)
        cls, box = step({k: tf.constant(v) for k, v in batch.items()})
        losses.append(float(cls) + float(box))
    train_seconds = time.time() - start

    detections = {SQUARE: [], DISC: []}
    truth = {SQUARE: {}, DISC: {}}
    for item in items:
        probs, boxes = inference.score_proposals(lambda x: net(x, training=False), item.image,
                                                 item.proposals, SCALE, 2 * SCALE)
        for k, score, box in inference.postprocess(probs, boxes):
            if k in detections:  # the 18 unused classes never have ground truth
                detections[k].append((item.image_id, score, box))
        for k in truth:
            mine = item.gt_labels == k
            truth[k][item.image_id] = (item.gt_boxes[mine], np.zeros(mine.sum(), bool))
    aps = {k: voc_metrics.detection_ap(detections[k], truth[k]) for k in truth}
    mean = voc_metrics.mean_ap(list(aps.values()))
    print(f"\nlearning test: AP square {aps[SQUARE]:.3f}, disc {aps[DISC]:.3f}, mean {mean:.3f}; "
          f"{STEPS} steps in {train_seconds:.1f} s ({train_seconds / STEPS:.3f} s/step); "
          f"loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}")
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert mean >= 0.9, aps
