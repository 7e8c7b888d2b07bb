"""The network-in-network models of Spatial Contrasting (Hoffer, Hubara & Ailon 2017, Table 4).

Each model is written out exactly as its column of Table 4; `sc` is the endpoint at the row
"Spatial contrasting criterion", where SC samples its patches.

    nin_stl10   (96 x 96 x 3)            nin_cifar10 (32 x 32 x 3)       nin_mnist (28 x 28 x 1)
    5x5 conv 64  BN ReLU                 3x3 conv 96  BN LReLU           5x5 conv 32 ReLU
    1x1 conv 160 BN ReLU                 3x3 conv 96  BN LReLU
    1x1 conv 96  BN ReLU                 3x3 conv 96  BN LReLU
    3x3 max-pool/2           -> block1   2x2 max-pool/2, BN -> block1    2x2 max-pool/2 BN -> block1
    5x5 conv 192 BN ReLU                 3x3 conv 192 BN LReLU           3x3 conv 64 BN ReLU
    1x1 conv 192 BN ReLU                 3x3 conv 192 BN LReLU           3x3 conv 64 BN ReLU
    1x1 conv 192 BN ReLU                 3x3 conv 192 BN LReLU
    3x3 max-pool/2           -> block2   2x2 max-pool/2, BN -> block2    2x2 max-pool/2 BN -> block2
    3x3 conv 192 BN ReLU
    1x1 conv 192 BN ReLU
    1x1 conv 192 BN ReLU     -> block3
    ---------------- Spatial contrasting criterion: "sc" = the endpoint just above ----------------
    3x3 conv 256 ReLU                    3x3 conv 192 BN LReLU           3x3 conv 128 BN ReLU
    3x3 max-pool/2                       1x1 conv 192 BN LReLU           1x1 conv 10 BN ReLU
    dropout 0.5                          1x1 conv 10  BN LReLU           global average pooling
    3x3 conv 128 ReLU                    global average pooling
    dropout 0.5
    fully-connected 10
    -> head                              -> head                         -> head
    -> logits (10-way softmax)           -> logits                       -> logits

Choices the table leaves open, and why:
- Padding is "same" for every convolution and max-pooling (3x3/2 pools take ceil(H/2)). The
  maps then keep H/2^k cells, so the SC map is 24x24 on STL10, 8x8 on CIFAR-10 and 7x7 on
  MNIST, and another input size just scales them.
- LeakyReLU slope 0.1, the value of the ladder-network models (Rasmus et al. 2015) that the
  CIFAR-10 column is taken from.
- Convolutions followed by BN have no bias (the BN shift replaces it); the others do.
- BN as in `models.layers.batch_norm`: Torch's momentum and epsilon (the paper used Torch7),
  global-batch statistics under tf.distribute.
- The logits are what the table's last row gives to the softmax, activation included: the
  global average of the last BN-ReLU/LReLU map for CIFAR-10 and MNIST, and the fc layer for
  STL10. They are float32 even under a mixed-precision policy.

`head` selects what follows `sc`:
- "softmax" (default): the table's classifier, endpoint `head` (the last map or vector before
  the logits) and `logits` [N, num_classes].
- "nat": a NAT embedding instead of the classifier: the global average of `sc`, a
  Dense(feature_dim) and L2 normalisation -> `embedding` [N, feature_dim], unit rows (the
  Dense layer and the normalisation compute in float32 under a mixed-precision policy).
- "none": stop at `sc`.
The layers up to `sc` have the same names in every head, so SC or NAT weights load by name
into the "softmax" model for fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from models.layers import L2Normalize, batch_norm
from runtime.errors import InvalidInput

HEADS = ("softmax", "nat", "none")
LEAKY_SLOPE = 0.1


@dataclass(frozen=True)
class Conv:
    filters: int  # 0 means num_classes: the classifier's 10-way layer
    kernel: int
    bn: bool = True


@dataclass(frozen=True)
class Pool:
    size: int
    bn: bool = False  # BN after the pooling ("2x2 max-pooling, stride 2 BN")


@dataclass(frozen=True)
class Dropout:
    rate: float


@dataclass(frozen=True)
class Flatten:
    pass


@dataclass(frozen=True)
class Logits:
    """The last row: fully-connected (STL10) or global average pooling; float32 output."""

    pooled: bool


CLASSES = 0

# Each model: (input shape, activation, blocks before sc, classifier after sc).
# A block is (endpoint name, layers); `sc` is the last block's output.
_SPECS = {
    "nin_stl10": (
        (96, 96, 3),
        "relu",
        [
            ("block1", [Conv(64, 5), Conv(160, 1), Conv(96, 1), Pool(3)]),
            ("block2", [Conv(192, 5), Conv(192, 1), Conv(192, 1), Pool(3)]),
            ("block3", [Conv(192, 3), Conv(192, 1), Conv(192, 1)]),
        ],
        [Conv(256, 3, bn=False), Pool(3), Dropout(0.5), Conv(128, 3, bn=False), Dropout(0.5),
         Flatten(), Logits(pooled=False)],
    ),
    "nin_cifar10": (
        (32, 32, 3),
        "leaky_relu",
        [
            ("block1", [Conv(96, 3), Conv(96, 3), Conv(96, 3), Pool(2, bn=True)]),
            ("block2", [Conv(192, 3), Conv(192, 3), Conv(192, 3), Pool(2, bn=True)]),
        ],
        [Conv(192, 3), Conv(192, 1), Conv(CLASSES, 1), Logits(pooled=True)],
    ),
    "nin_mnist": (
        (28, 28, 1),
        "relu",
        [
            ("block1", [Conv(32, 5, bn=False), Pool(2, bn=True)]),
            ("block2", [Conv(64, 3), Conv(64, 3), Pool(2, bn=True)]),
        ],
        [Conv(128, 3), Conv(CLASSES, 1), Logits(pooled=True)],
    ),
}

_KIND = {Conv: "conv", Pool: "pool", Dropout: "dropout", Flatten: "flatten", Logits: "logits"}


def _activation(kind: str, name: str) -> keras.layers.Layer:
    if kind == "leaky_relu":
        return keras.layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=name)
    return keras.layers.ReLU(name=name)


def _bn(name: str) -> keras.layers.Layer:
    return batch_norm(name)


def _apply(x, spec, name: str, activation: str, num_classes: int):
    """Apply one row of the table."""
    if isinstance(spec, Conv):
        filters = spec.filters or num_classes
        x = keras.layers.Conv2D(filters, spec.kernel, padding="same", use_bias=not spec.bn,
                                kernel_initializer="he_normal", name=name)(x)
        if spec.bn:
            x = _bn(f"{name}_bn")(x)
        return _activation(activation, f"{name}_act")(x)
    if isinstance(spec, Pool):
        x = keras.layers.MaxPooling2D(spec.size, strides=2, padding="same", name=name)(x)
        return _bn(f"{name}_bn")(x) if spec.bn else x
    if isinstance(spec, Dropout):
        return keras.layers.Dropout(spec.rate, name=name)(x)
    if isinstance(spec, Flatten):
        return keras.layers.Flatten(name=name)(x)
    if isinstance(spec, Logits):
        if spec.pooled:
            return keras.layers.GlobalAveragePooling2D(name="logits", dtype="float32")(x)
        return keras.layers.Dense(num_classes, name="logits", dtype="float32")(x)
    raise TypeError(f"unknown layer spec {spec!r}")


def _build(model_name: str, input_shape, head: str, num_classes: int, feature_dim: int
           ) -> keras.Model:
    default_shape, activation, blocks, classifier = _SPECS[model_name]
    input_shape = tuple(default_shape if input_shape is None else input_shape)
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if len(input_shape) != 3 or input_shape[-1] != default_shape[-1]:
        raise InvalidInput(f"{model_name} expects input_shape (H, W, {default_shape[-1]}); "
                           f"got {input_shape}")
    if min(input_shape[:2]) < 4:
        raise InvalidInput(f"{model_name} needs H, W >= 4; got {input_shape}")
    if num_classes < 1 or feature_dim < 1:
        raise InvalidInput("num_classes and feature_dim must be positive")

    inputs = keras.Input(shape=input_shape, name="images")
    x = inputs
    endpoints = {}
    for b, (endpoint, layers) in enumerate(blocks, start=1):
        for i, spec in enumerate(layers, start=1):
            x = _apply(x, spec, f"{_KIND[type(spec)]}{b}_{i}", activation, num_classes)
        endpoints[endpoint] = x
    endpoints["sc"] = x

    if head == "softmax":
        b = len(blocks) + 1
        for i, spec in enumerate(classifier, start=1):
            if isinstance(spec, Logits):
                endpoints["head"] = x
            x = _apply(x, spec, f"{_KIND[type(spec)]}{b}_{i}", activation, num_classes)
        endpoints["logits"] = x
    elif head == "nat":
        pooled = keras.layers.GlobalAveragePooling2D(name="embedding_pool")(x)
        z = keras.layers.Dense(feature_dim, kernel_initializer="he_normal",
                               name="embedding_fc", dtype="float32")(pooled)
        endpoints["embedding"] = L2Normalize(name="embedding", dtype="float32")(z)
    return keras.Model(inputs, endpoints, name=model_name)


def nin_stl10(input_shape=None, head: str = "softmax", num_classes: int = 10,
              feature_dim: int = 128) -> keras.Model:
    """SC Table 4, STL10 column. Default input (96, 96, 3); `sc` is [N, H/4, W/4, 192]."""
    return _build("nin_stl10", input_shape, head, num_classes, feature_dim)


def nin_cifar10(input_shape=None, head: str = "softmax", num_classes: int = 10,
                feature_dim: int = 128) -> keras.Model:
    """SC Table 4, CIFAR-10 column. Default input (32, 32, 3); `sc` is [N, H/4, W/4, 192]."""
    return _build("nin_cifar10", input_shape, head, num_classes, feature_dim)


def nin_mnist(input_shape=None, head: str = "softmax", num_classes: int = 10,
              feature_dim: int = 128) -> keras.Model:
    """SC Table 4, MNIST column. Default input (28, 28, 1); `sc` is [N, H/4, W/4, 64]."""
    return _build("nin_mnist", input_shape, head, num_classes, feature_dim)
