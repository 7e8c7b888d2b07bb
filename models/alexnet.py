"""AlexNet with batch normalisation: the backbone NAT trains (Bojanowski & Joulin 2017, Sec. 3.3).

Architecture (input 224 x 224 by default; 227 for the VOC protocol):

    front     fixed preprocessing: sobel (default) | gray | highpass | rgb   (models/layers.py)
    conv1     96 x 11x11, stride 4, zero padding 2      BN ReLU   -> "conv1"
    pool1     3x3 max, stride 2
    conv2     256 x 5x5, "same"                          BN ReLU   -> "conv2"
    pool2     3x3 max, stride 2
    conv3     384 x 3x3, "same"                          BN ReLU   -> "conv3"
    conv4     384 x 3x3, "same"                          BN ReLU   -> "conv4"
    conv5     256 x 3x3, "same"                          BN ReLU   -> "conv5"
    pool5     3x3 max, stride 2                                    -> "pool5"  [6, 6, 256]
    fc6       4096 (fc_units)                            BN ReLU   -> "fc6", then dropout 0.5
    fc7       4096 (fc_units)                            BN ReLU   -> "fc7", then dropout 0.5
    head      nat:     Dense(feature_dim) then L2 normalisation    -> "embedding" (unit rows)
              softmax: Dense(num_classes)                          -> "logits"
              none:    nothing more

Choices the paper leaves open, and why:
- conv1 pads 2 pixels on each side (the Torch AlexNet the released NAT code builds on), so
  that both 224 and 227 inputs give a 6 x 6 pool5 and fc6 has the same 9216 inputs at either
  size: a network pretrained at 224 transfers to the VOC protocol at 227 without surgery.
- The convolutions are not grouped (the two-GPU split of the 2012 paper is an artefact of its
  hardware).
- Convolutions and hidden fully-connected layers have no bias: the BN shift that follows makes
  it redundant.
- BN as in `models.layers.batch_norm`: Torch's momentum and epsilon, global-batch statistics
  under tf.distribute.
- The NAT embedding is linear (no ReLU, no BN) before the normalisation, so features can point
  anywhere on the sphere, as the targets do.
- Under a mixed-precision policy (models/precision.py) the head, NAT's Dense layer and L2
  normalisation or the logits, computes in float32.

Layer names are part of the checkpoint format: do not rename them.
"""

from __future__ import annotations

import keras

from models.layers import L2Normalize, batch_norm, preprocessing_layer
from runtime.errors import InvalidInput

HEADS = ("nat", "softmax", "none")


def _pool5_size(size: int) -> int:
    size = (size + 4 - 11) // 4 + 1  # conv1, pad 2, stride 4
    for _ in range(3):  # pool1, pool2, pool5: 3x3 stride 2, valid
        size = (size - 3) // 2 + 1
    return size


def _conv_bn_relu(x, name: str, filters: int, kernel: int, strides: int = 1,
                  padding: str = "same"):
    x = keras.layers.Conv2D(filters, kernel, strides=strides, padding=padding, use_bias=False,
                            kernel_initializer="he_normal", name=name)(x)
    x = batch_norm(f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _fc_bn_relu(x, name: str, units: int):
    x = keras.layers.Dense(units, use_bias=False, kernel_initializer="he_normal", name=name)(x)
    x = batch_norm(f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _check_arguments(input_shape, head: str, feature_dim: int, num_classes: int,
                     fc_units: int) -> None:
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if len(input_shape) != 3 or input_shape[-1] not in (1, 3):
        raise InvalidInput(f"input_shape must be (H, W, C) with C in {{1, 3}}; got {input_shape}")
    if min(_pool5_size(input_shape[0]), _pool5_size(input_shape[1])) < 1:
        raise InvalidInput(f"input_shape {input_shape} is too small for AlexNet: H, W >= 63")
    if feature_dim < 1 or num_classes < 1 or fc_units < 1:
        raise InvalidInput("feature_dim, num_classes and fc_units must be positive")


def alexnet(
    input_shape: tuple[int, int, int] = (224, 224, 3),
    preprocessing: str = "sobel",
    head: str = "nat",
    feature_dim: int = 2048,
    num_classes: int = 1000,
    dropout: float = 0.5,
    fc_units: int = 4096,
    name: str = "alexnet",
) -> keras.Model:
    """Build the BN AlexNet. Returns a keras.Model whose output is a dict of endpoints.

    Args:
      input_shape: (H, W, C) of the float input images, C in {1, 3}. H and W must be at least
        63 so that pool5 is not empty.
      preprocessing: the fixed front, one of models.layers.PREPROCESSINGS.
      head: "nat" (unit-norm `embedding` [N, feature_dim]), "softmax" (`logits`
        [N, num_classes]) or "none" (endpoints up to fc7 only).
      feature_dim: NAT target dimension d (the released code used 2048).
      num_classes: classes of the softmax head.
      dropout: dropout rate after fc6 and fc7.
      fc_units: width of fc6 and fc7 (4096; narrower only for small tests on a CPU).

    Endpoints: conv1..conv5 [N, h, w, c] (after BN and ReLU), pool5 [N, 6, 6, 256] at 224 or
    227, fc6 and fc7 [N, 4096] (after ReLU, before dropout), and embedding or logits (float32).
    """
    _check_arguments(input_shape, head, feature_dim, num_classes, fc_units)
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    front = preprocessing_layer(preprocessing)
    x = inputs if front is None else front(inputs)
    endpoints = {}

    x = keras.layers.ZeroPadding2D(2, name="conv1_pad")(x)
    x = endpoints["conv1"] = _conv_bn_relu(x, "conv1", 96, 11, strides=4, padding="valid")
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    x = endpoints["conv2"] = _conv_bn_relu(x, "conv2", 256, 5)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool2")(x)
    x = endpoints["conv3"] = _conv_bn_relu(x, "conv3", 384, 3)
    x = endpoints["conv4"] = _conv_bn_relu(x, "conv4", 384, 3)
    x = endpoints["conv5"] = _conv_bn_relu(x, "conv5", 256, 3)
    x = endpoints["pool5"] = keras.layers.MaxPooling2D(3, strides=2, name="pool5")(x)

    x = keras.layers.Flatten(name="flatten")(x)
    x = endpoints["fc6"] = _fc_bn_relu(x, "fc6", fc_units)
    x = keras.layers.Dropout(dropout, name="fc6_dropout")(x)
    x = endpoints["fc7"] = _fc_bn_relu(x, "fc7", fc_units)
    x = keras.layers.Dropout(dropout, name="fc7_dropout")(x)

    if head == "nat":
        z = keras.layers.Dense(feature_dim, kernel_initializer="he_normal",
                               name="embedding_fc", dtype="float32")(x)
        endpoints["embedding"] = L2Normalize(name="embedding", dtype="float32")(z)
    elif head == "softmax":
        endpoints["logits"] = keras.layers.Dense(num_classes, name="logits",
                                                 dtype="float32")(x)
    return keras.Model(inputs, endpoints, name=name)
