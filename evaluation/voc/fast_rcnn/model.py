"""The Fast R-CNN detector on the zoo's AlexNet (Girshick 2015, Sec. 2).

    images [B, H, W, 3] float (any H, W >= 63)
      -> the AlexNet front and conv1..conv5 (the layer objects of `models.alexnet`)   "conv5"
    rois [R, 4] (input pixels), roi_indices [R]
      -> RoI max-pooling of conv5 to 6 x 6 (`roi_pool.roi_max_pool`)                 "pool5"
      -> fc6, fc7 of `models.alexnet` (BN, ReLU, dropout 0.5)                          "fc7"
      -> cls_score: Dense(21), N(0, 0.01) init           -> "cls_logits" [R, 21] float32
      -> bbox_pred: Dense(4 * 21), N(0, 0.001) init      -> "bbox_deltas" [R, 84] float32

Every layer up to fc7 is the layer of an AlexNet built with head "none", so its variables keep
the AlexNet keys (`models.weights.named_variables`) and a pretraining checkpoint loads by name:
conv1..conv5 always, fc6 and fc7 when the checkpoint holds them (9216 = 6 * 6 * 256 inputs,
as pool5 of the pretraining network).

Batch normalisation runs in inference mode everywhere (its layers are not trainable): with 2
images per step, batch statistics would be poor, and frozen BN is a fixed per-channel affine
map, i.e. the BN folded into the pretrained weights (NAT removes BN for transfer).

Loss (Fast R-CNN eq. 1, lambda = 1): the mean softmax cross-entropy over the R RoIs plus
sum over foreground RoIs of smooth-L1(deltas[class] - targets), divided by R, with
smooth-L1(x) = 0.5 x^2 if |x| < 1 else |x| - 0.5, summed over the 4 coordinates.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from evaluation.voc.fast_rcnn.roi_pool import roi_max_pool
from models import build_model
from models.weights import LoadReport, load_weights

NUM_CLASSES = 21  # 20 VOC classes and background (index 0)
CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
FC_LAYERS = ("fc6", "fc6_bn", "fc7", "fc7_bn")
FREEZE_CHOICES = ("none", *CONV_LAYERS)


class RoiMaxPool(keras.layers.Layer):
    """Keras wrapper of `roi_max_pool`: (features, boxes, box_indices) -> [R, P, P, C]."""

    def __init__(self, pooled_size: int = 6, sampling: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.pooled_size = pooled_size
        self.sampling = sampling

    def call(self, features, boxes, box_indices):
        return roi_max_pool(features, boxes, box_indices, self.pooled_size, self.sampling)

    def compute_output_shape(self, features_shape, boxes_shape, box_indices_shape):
        return (boxes_shape[0], self.pooled_size, self.pooled_size, features_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "pooled_size": self.pooled_size,
                "sampling": self.sampling}


def build_detector(preprocessing: str = "sobel", num_classes: int = NUM_CLASSES,
                   dropout: float = 0.5, sampling: int = 2, fc_units: int = 4096
                   ) -> keras.Model:
    """The detector of the module docstring.

    `fc_units` other than 4096 builds AlexNet with narrower fc6 and fc7 (a small detector for
    tests on CPU; it cannot load pretrained fc weights, and `load_weights` says so by the
    shape mismatch). Every layer up to fc7, BN included, is AlexNet's own.

    Inputs: {"images": [B, H, W, 3] float32, "rois": [R, 4] float32 (x1, y1, x2, y2), 0-based
    centres of the first and last input pixel covered, "roi_indices": [R] int32}.
    Outputs: {"conv5", "pool5", "fc7", "cls_logits" [R, num_classes], "bbox_deltas"
    [R, 4 * num_classes]}.
    """
    alexnet = build_model("alexnet", input_shape=(227, 227, 3), preprocessing=preprocessing,
                          head="none", dropout=dropout, fc_units=fc_units)
    images = keras.Input(shape=(None, None, 3), name="images")
    rois = keras.Input(shape=(4,), name="rois")
    roi_indices = keras.Input(shape=(), dtype="int32", name="roi_indices")
    x = images
    # Up to conv5 the AlexNet graph is a chain: re-apply its layers to a free-size input.
    for layer in alexnet.layers[1:]:
        x = layer(x)
        if layer.name == "conv5_relu":
            break
    endpoints = {"conv5": x}
    x = endpoints["pool5"] = RoiMaxPool(6, sampling, name="roi_pool")(x, rois, roi_indices)
    x = keras.layers.Flatten(name="roi_flatten")(x)
    for name in ("fc6", "fc6_bn", "fc6_relu", "fc6_dropout", "fc7", "fc7_bn", "fc7_relu"):
        x = alexnet.get_layer(name)(x)
    endpoints["fc7"] = x
    # With head "none" the AlexNet graph ends at fc7, before its dropout.
    x = keras.layers.Dropout(dropout, name="fc7_dropout")(x)
    endpoints["cls_logits"] = keras.layers.Dense(
        num_classes, name="cls_score", dtype="float32",
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01))(x)
    endpoints["bbox_deltas"] = keras.layers.Dense(
        4 * num_classes, name="bbox_pred", dtype="float32",
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.001))(x)
    net = keras.Model({"images": images, "rois": rois, "roi_indices": roi_indices}, endpoints,
                      name="fast_rcnn_alexnet")
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return net


def load_pretrained(net: keras.Model, checkpoint: str) -> tuple[LoadReport, str]:
    """Load a pretraining checkpoint into `build_detector`'s network, by layer name.

    The front and conv1..conv5 (with their BN) must all be there. fc6 and fc7 are loaded too
    when the checkpoint holds them with the same shapes, which is the case for an AlexNet
    pretrained with a 6 x 6 pool5 (224 or 227 pixels); otherwise they keep their fresh
    initialisation.

    Returns:
      (the report of the convolutional part, a one-line note on fc6/fc7).

    Raises:
      FileNotFoundError: no checkpoint; ValueError: a conv layer is absent or differs.
    """
    images = keras.Input(shape=(None, None, 3))
    x = images
    for layer in net.layers[1:]:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        x = layer(x)
        if layer.name == "conv5_relu":
            break
    report = load_weights(keras.Model(images, x, name=f"{net.name}_convs"), checkpoint,
                          require=CONV_LAYERS)
    features = keras.Input(shape=(net.get_layer("fc6").kernel.shape[0],))
    x = features
    for name in ("fc6", "fc6_bn", "fc6_relu", "fc7", "fc7_bn", "fc7_relu"):
        x = net.get_layer(name)(x)
    try:
        fc = load_weights(keras.Model(features, x, name=f"{net.name}_fc"), checkpoint,
                          require=FC_LAYERS)
        note = f"fc6 and fc7 loaded ({len(fc.loaded)} weights)"
    except ValueError as error:
        note = f"fc6 and fc7 start fresh: {error}"
    return report, note


def set_frozen(net: keras.Model, freeze_through: str = "none") -> list[keras.Variable]:
    """Freeze the front and conv1 .. `freeze_through` ("none": nothing); return the
    trainable variables."""
    if freeze_through not in FREEZE_CHOICES:
        raise ValueError(f"freeze_through={freeze_through!r}: choose one of "
                         f"{', '.join(FREEZE_CHOICES)}")
    if freeze_through != "none":
        frozen = CONV_LAYERS[:CONV_LAYERS.index(freeze_through) + 1]
        for layer in net.layers:
            if layer.name.split("_")[0] in frozen:
                layer.trainable = False
    return list(net.trainable_variables)


def smooth_l1(x: tf.Tensor) -> tf.Tensor:
    """Elementwise 0.5 x^2 where |x| < 1, else |x| - 0.5."""
    ax = tf.abs(x)
    return tf.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def detection_loss(cls_logits: tf.Tensor, bbox_deltas: tf.Tensor, labels: tf.Tensor,
                   targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(classification loss, box loss) of Fast R-CNN, as the module docstring defines them.

    Args:
      cls_logits: [R, K] float.
      bbox_deltas: [R, 4K] float.
      labels: [R] int in [0, K) (0: background).
      targets: [R, 4] normalised box targets (ignored for background RoIs).
    """
    labels = tf.cast(labels, tf.int32)
    num = tf.maximum(tf.cast(tf.shape(labels)[0], tf.float32), 1.0)
    cls = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=tf.cast(cls_logits, tf.float32))) / num
    deltas = tf.reshape(tf.cast(bbox_deltas, tf.float32), [tf.shape(labels)[0], -1, 4])
    mine = tf.gather(deltas, labels, axis=1, batch_dims=1)  # [R, 4]: the true class's deltas
    per_roi = tf.reduce_sum(smooth_l1(mine - tf.cast(targets, tf.float32)), axis=1)
    box = tf.reduce_sum(per_roi * tf.cast(labels > 0, tf.float32)) / num
    return cls, box


def scale_factor(height: int, width: int, target: int, max_size: int) -> float:
    """Fast R-CNN's image scale: shorter side to `target` unless the longer then exceeds
    `max_size`, in which case the longer side becomes `max_size`."""
    scale = target / min(height, width)
    if round(scale * max(height, width)) > max_size:
        scale = max_size / max(height, width)
    return scale


def resized_shape(height: int, width: int, target: int, max_size: int) -> tuple[int, int]:
    """(H', W') of an image scaled by `scale_factor` (each side at least 63 for AlexNet)."""
    scale = scale_factor(height, width, target, max_size)
    return max(round(height * scale), 63), max(round(width * scale), 63)


def to_input_pixels(boxes, height: int, width: int, new_height: int, new_width: int
                    ) -> np.ndarray:
    """Devkit boxes [N, 4] of an H x W image -> RoI coordinates in the resized H' x W' input.

    The box covers the continuous span [x1 - 1, x2] of the original image, i.e.
    [(x1 - 1) sx, x2 sx] after resizing (sx = W' / W); the returned values are the 0-based
    centres of the first and last resized pixel in that span: (x1 - 1) sx and x2 sx - 1
    (likewise in y), so a 1 x 1 scale gives (x1 - 1, x2 - 1).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sx, sy = new_width / width, new_height / height
    return np.stack([(boxes[:, 0] - 1) * sx, (boxes[:, 1] - 1) * sy,
                     boxes[:, 2] * sx - 1, boxes[:, 3] * sy - 1], axis=1).astype(np.float32)
