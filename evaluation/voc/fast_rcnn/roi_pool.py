"""RoI max-pooling (Fast R-CNN's RoI pooling layer) with `crop_and_resize`.

A RoI given in network-input pixels is mapped onto the feature map and cut into a
`pooled_size` x `pooled_size` grid of bins; each output is the maximum of its bin. Exact Caffe
RoI pooling takes the maximum over the integer feature cells of a bin, which has no efficient
TensorFlow kernel. Here each bin is instead sampled on a `sampling` x `sampling` grid of
bilinearly interpolated points and the maximum of those is taken:

    crops  = crop_and_resize(features, boxes / (H - 1, W - 1), [P * s, P * s], "bilinear")
    pooled = max_pool(crops, s x s, stride s)                               -> [R, P, P, C]

with P = pooled_size, s = sampling. Feature coordinates come from pixel coordinates by the
geometry of the network: cell k of the feature map is centred on input pixel
`stride * k + offset`. For the AlexNet of `models.alexnet` (conv1 11x11 stride 4 with 2 pixels
of padding, then three 3x3 stride-2 max-pools of which two come before conv5) conv5 cell k is
centred on pixel 16 k + 15, so stride 16 and offset 15. Sample points are clipped to the map,
so a RoI past the border samples the border cells.

The gradient flows to the features through `crop_and_resize` (bilinear weights) and the max.
"""

from __future__ import annotations

import tensorflow as tf

ALEXNET_CONV5_STRIDE = 16
ALEXNET_CONV5_OFFSET = 15


def pixel_to_feature(coords: tf.Tensor, stride: float = ALEXNET_CONV5_STRIDE,
                     offset: float = ALEXNET_CONV5_OFFSET) -> tf.Tensor:
    """Feature-map coordinates of input-pixel coordinates: (p - offset) / stride."""
    return (coords - offset) / stride


def roi_max_pool(features: tf.Tensor, boxes: tf.Tensor, box_indices: tf.Tensor,
                 pooled_size: int = 6, sampling: int = 2,
                 stride: float = ALEXNET_CONV5_STRIDE,
                 offset: float = ALEXNET_CONV5_OFFSET) -> tf.Tensor:
    """Max-pool each RoI of `boxes` on `features` to a fixed grid.

    Args:
      features: [B, H, W, C] feature map.
      boxes: [R, 4] (x1, y1, x2, y2) in input pixels, 0-based coordinates of the centres of
        the first and last pixel covered (floats).
      box_indices: [R] int32, the image of each box in the batch.
      pooled_size: P, the output grid (Fast R-CNN with AlexNet: 6, to feed fc6).
      sampling: s, sample points per bin and axis.
      stride, offset: input pixel of feature cell k = stride * k + offset.

    Returns:
      [R, P, P, C], the features' dtype.
    """
    if pooled_size < 1 or sampling < 1:
        raise ValueError(f"pooled_size={pooled_size} and sampling={sampling} must be positive")
    boxes = tf.cast(boxes, tf.float32)
    shape = tf.shape(features)
    height = tf.cast(shape[1], tf.float32)
    width = tf.cast(shape[2], tf.float32)
    x1, y1, x2, y2 = tf.unstack(pixel_to_feature(boxes, stride, offset), axis=1)
    # crop_and_resize maps a normalised y to y * (H - 1); a 1-cell map has only y = 0.
    ny = tf.maximum(height - 1, 1.0)
    nx = tf.maximum(width - 1, 1.0)
    normalised = tf.stack([tf.clip_by_value(y1, 0, height - 1) / ny,
                           tf.clip_by_value(x1, 0, width - 1) / nx,
                           tf.clip_by_value(y2, 0, height - 1) / ny,
                           tf.clip_by_value(x2, 0, width - 1) / nx], axis=1)
    size = pooled_size * sampling
    crops = tf.image.crop_and_resize(tf.cast(features, tf.float32), normalised,
                                     tf.cast(box_indices, tf.int32), [size, size],
                                     method="bilinear")
    if sampling > 1:
        crops = tf.nn.max_pool2d(crops, sampling, sampling, "VALID")
    return tf.cast(crops, features.dtype)
