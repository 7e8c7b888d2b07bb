"""The detector: AlexNet layers and weights, freezing, the loss, image scaling, inference."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from evaluation.voc.fast_rcnn import inference
from evaluation.voc.fast_rcnn import model as det_model
from models import build_model
from models.weights import load_weights, named_variables
from runtime.errors import InvalidInput


def test_backbone_is_alexnet_and_loads_its_checkpoint(tmp_path):
    alexnet = build_model("alexnet", input_shape=(227, 227, 3), preprocessing="sobel",
                          head="nat", feature_dim=8)
    for variable in alexnet.variables:  # non-trivial BN statistics, so loading shows
        if "moving" in variable.path or "gamma" in variable.path:
            variable.assign(np.random.default_rng(0).uniform(0.5, 2, variable.shape))
    tf.train.Checkpoint(model=named_variables(alexnet)).save(str(tmp_path / "ckpt"))
    net = det_model.build_detector("sobel")
    report, note = det_model.load_pretrained(net, str(tmp_path))
    assert set(det_model.CONV_LAYERS) <= {key.split(".")[0] for key in report.loaded}
    assert note.startswith("fc6 and fc7 loaded")
    for name in ("fc6", "fc7_bn"):
        for ours, theirs in zip(net.get_layer(name).weights, alexnet.get_layer(name).weights,
                                strict=True):
            np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    # conv5 of the detector equals AlexNet's at 227 (same layers, same weights), and the
    # detector also takes other sizes.
    image = np.random.default_rng(1).uniform(0, 1, (1, 227, 227, 3)).astype(np.float32)
    rois = {"rois": np.array([[0, 0, 226, 226]], np.float32),
            "roi_indices": np.zeros(1, np.int32)}
    ours = net({"images": image, **rois}, training=False)
    np.testing.assert_allclose(ours["conv5"], alexnet(image, training=False)["conv5"],
                               rtol=1e-4, atol=1e-4)
    assert ours["cls_logits"].shape == (1, 21) and ours["bbox_deltas"].shape == (1, 84)
    assert ours["pool5"].shape == (1, 6, 6, 256)
    other = net({"images": np.zeros((1, 100, 180, 3), np.float32), **rois}, training=False)
    assert other["conv5"].shape == (1, 5, 10, 256)
    # A narrower fc cannot take the 4096-wide pretrained fc6: the convs still load.
    small = det_model.build_detector("sobel", fc_units=64)
    report, note = det_model.load_pretrained(small, str(tmp_path))
    assert set(det_model.CONV_LAYERS) <= {key.split(".")[0] for key in report.loaded}
    assert note.startswith("fc6 and fc7 start fresh") and "fc6.kernel has shape" in note
    with pytest.raises(InvalidInput, match=r"fc6\.kernel"):
        load_weights(small, str(tmp_path))
    # A checkpoint without the convs is refused.
    tf.train.Checkpoint(model={"fc6.kernel": alexnet.get_layer("fc6").kernel}).save(
        str(tmp_path / "fc_only" / "ckpt"))
    with pytest.raises(InvalidInput, match="holds no weights of fast_rcnn_alexnet_convs"):
        det_model.load_pretrained(small, str(tmp_path / "fc_only"))


def test_batch_norm_frozen_and_conv_freezing():
    net = det_model.build_detector("rgb", fc_units=16)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
                   for layer in net.layers)
    everything = {v.path for v in det_model.set_frozen(net, "none")}
    trained = {v.path for v in det_model.set_frozen(net, "conv2")}
    assert {"conv1/kernel", "conv2/kernel"} <= everything - trained
    assert {"conv3/kernel", "fc6/kernel", "cls_score/bias", "bbox_pred/kernel"} <= trained
    with pytest.raises(ValueError, match="freeze_through='fc6'"):
        det_model.set_frozen(net, "fc6")


def test_detection_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3)) * 2
    deltas = rng.normal(size=(5, 12)) * 1.5
    labels = np.array([0, 2, 1, 0, 2])
    targets = rng.normal(size=(5, 4))
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    cls = -np.mean(log_probs[np.arange(5), labels])
    diff = deltas.reshape(5, 3, 4)[np.arange(5), labels] - targets
    smooth = np.where(np.abs(diff) < 1, 0.5 * diff ** 2, np.abs(diff) - 0.5).sum(1)
    box = np.sum(smooth * (labels > 0)) / 5
    got = det_model.detection_loss(tf.constant(logits, tf.float32),
                                   tf.constant(deltas, tf.float32), tf.constant(labels),
                                   tf.constant(targets, tf.float32))
    np.testing.assert_allclose([float(got[0]), float(got[1])], [cls, box], rtol=1e-5)
    np.testing.assert_allclose(det_model.smooth_l1(tf.constant([-2.0, -0.5, 0.0, 0.5, 3.0])),
                               [1.5, 0.125, 0.0, 0.125, 2.5])


def test_scaling_and_input_pixels():
    assert det_model.scale_factor(375, 500, 600, 1000) == 1.6  # shorter side to 600
    assert det_model.resized_shape(375, 500, 600, 1000) == (600, 800)
    assert det_model.scale_factor(200, 1000, 600, 1000) == 1.0  # longer side capped at 1000
    assert det_model.resized_shape(200, 1000, 600, 1000) == (200, 1000)
    # At scale 1 the RoI spans the 0-based centres of the box's pixels; at scale 2 the box
    # (1, 1, 2, 2) covers resized pixels 0..3.
    np.testing.assert_allclose(det_model.to_input_pixels([[1, 3, 10, 20]], 50, 60, 50, 60),
                               [[0, 2, 9, 19]])
    np.testing.assert_allclose(det_model.to_input_pixels([[1, 1, 2, 2]], 50, 60, 100, 120),
                               [[0, 0, 3, 3]])


def test_postprocess_nms_threshold_and_cap():
    # Three proposals, three classes: class 1 has two overlapping boxes (NMS keeps the best),
    # class 2 one box under the score threshold.
    probs = np.array([[0.1, 0.8, 0.04], [0.2, 0.7, 0.1], [0.3, 0.1, 0.6]])
    boxes = np.zeros((3, 12))
    boxes[:, 4:8] = [[1, 1, 10, 10], [2, 1, 11, 10], [30, 30, 40, 40]]
    boxes[:, 8:12] = [[1, 1, 10, 10], [50, 50, 60, 60], [30, 30, 40, 40]]
    found = inference.postprocess(probs, boxes, score_threshold=0.05, nms_threshold=0.3)
    assert [(k, s) for k, s, _ in found] == [(1, 0.8), (2, 0.6), (1, 0.1), (2, 0.1)]
    np.testing.assert_array_equal(found[0][2], [1, 1, 10, 10])
    assert len(inference.postprocess(probs, boxes, max_per_image=2)) == 2
