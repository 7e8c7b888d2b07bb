"""Image files and the zoo's image convention.

Every image the networks see is float32 [H, W, C] in [0, 1] at the model's input shape. One
rule maps any image to it (`resize_to_input`), used by pretraining, the labelled datasets and
the exported SavedModels alike:

- decoding (`decode_image`): JPEG, PNG, GIF (first frame), BMP or WebP bytes -> uint8 RGB
  (grey files tiled, alpha dropped, 16-bit PNGs rescaled; `decode_pixels`) -> float32 / 255;
  `decode_jpeg_window` decodes a window of a JPEG without the rest of the file;
- channels (`to_channels`): a grey image is tiled to 3 channels for an RGB model; a colour
  image is averaged over its channels for a grey model (the rule of `Grayscale`);
- size: resized bilinearly with antialiasing when H, W differ from the model's, without
  keeping the aspect ratio; with `center_crop`, the largest central square is cut first
  (ImageNet). An image already at the input size is left bit-exact.
"""

from __future__ import annotations

import os

import tensorflow as tf

from runtime.errors import MissingInput

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
"""The file types `decode_image` reads (matched case-insensitively)."""


def list_images(root: str) -> list[str]:
    """Image files under `root` (by extension, any case), recursively, in sorted path order.

    Raises FileNotFoundError when `root` is not a directory.
    """
    if not os.path.isdir(root):
        raise MissingInput(f"image folder {root} is not a directory")
    found = []
    for directory, _, files in os.walk(root):
        found.extend(os.path.join(directory, f) for f in files
                     if f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


def decode_pixels(raw: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> uint8 [h, w, 3] (the decoding rule of the module docstring)."""
    image = tf.io.decode_image(raw, channels=3, expand_animations=False, dtype=tf.uint8)
    return tf.ensure_shape(image, [None, None, 3])


def decode_image(raw: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> float32 [h, w, 3] in [0, 1]."""
    return tf.cast(decode_pixels(raw), tf.float32) / 255.0


JPEG_WINDOW_MARGIN = 2
"""Pixels decoded around a JPEG window (see `decode_jpeg_window`)."""


def decode_jpeg_window(raw: tf.Tensor, begin: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """uint8 [size[0], size[1], 3]: the pixels [y:y+h, x:x+w] of a JPEG file, with
    (y, x) = begin[:2] and (h, w) = size[:2], decoding little more than that window.

    The same pixels as `decode_pixels(raw)[y:y+h, x:x+w]`, bit for bit.
    `tf.io.decode_and_crop_jpeg` upsamples subsampled chroma (4:2:0, 4:2:2) with a triangle
    filter that reaches one chroma sample, two pixels, past each pixel, and treats the edge
    of the window as the edge of the image; so the window grown by JPEG_WINDOW_MARGIN pixels
    on each side (clipped to the image) is decoded, and the margin cut off.

    Cost, measured on 500 x 375 photographs (benchmarks/input_pipeline.py): the decoder stops
    after the window's last row, but rows above it and columns beside it cost nearly as much
    as when they are kept. A window in the top half is about 40% cheaper than the whole file;
    a random 35-100% box saves 5-10% of the decoding on average.
    """
    shape = tf.io.extract_jpeg_shape(raw)
    begin = tf.cast(begin[:2], tf.int32)
    end = begin + tf.cast(size[:2], tf.int32)
    start = tf.maximum(begin - JPEG_WINDOW_MARGIN, 0)
    stop = tf.minimum(end + JPEG_WINDOW_MARGIN, shape[:2])
    window = tf.io.decode_and_crop_jpeg(raw, tf.concat([start, stop - start], 0), channels=3)
    offset = begin - start
    return tf.ensure_shape(window[offset[0]:offset[0] + end[0] - begin[0],
                                  offset[1]:offset[1] + end[1] - begin[1]], [None, None, 3])


def to_channels(images: tf.Tensor, channels: int) -> tf.Tensor:
    """[..., c] with c in {1, 3} -> [..., channels]: tile a grey image, average a colour one.
    The input's channel count may be unknown until run time."""
    found = images.shape[-1]
    if channels == 1:
        if found == 1:
            return images
        return tf.reduce_mean(images, axis=-1, keepdims=True)
    if channels != 3:
        raise ValueError(f"images have 1 or 3 channels; cannot make {channels}")
    if found == 3:
        return images
    if found == 1:
        return tf.concat([images] * 3, axis=-1)
    if found is not None:
        raise ValueError(f"cannot map {found} channels to {channels}")
    multiples = tf.concat([tf.ones([tf.rank(images) - 1], tf.int32), [3]], axis=0)
    tiled = tf.cond(tf.equal(tf.shape(images)[-1], 1), lambda: tf.tile(images, multiples),
                    lambda: images)
    return tf.ensure_shape(tiled, [*images.shape[:-1], 3])


def resize_to_input(images, input_shape: tuple[int, int, int], center_crop: bool = False
                    ) -> tf.Tensor:
    """Images [N, h, w, c] or [h, w, c] (float) -> float32 [N, H, W, C] or [H, W, C], with
    (H, W, C) = `input_shape` (module docstring). h, w, c may be unknown until run time."""
    height, width, channels = (int(d) for d in input_shape)
    x = tf.cast(tf.convert_to_tensor(images), tf.float32)
    single = x.shape.rank == 3
    if single:
        x = x[None]
    if x.shape.rank != 4:
        raise ValueError(f"images must be [N, h, w, c] or [h, w, c]; got shape {x.shape}")
    if center_crop:
        h, w = tf.shape(x)[1], tf.shape(x)[2]
        side = tf.minimum(h, w)
        x = tf.image.crop_to_bounding_box(x, (h - side) // 2, (w - side) // 2, side, side)
    x = to_channels(x, channels)
    static = x.shape[1:3]
    if static[0] is not None and static[1] is not None:
        if (static[0], static[1]) != (height, width):
            x = tf.image.resize(x, (height, width), method="bilinear", antialias=True)
    else:
        same = tf.reduce_all(tf.equal(tf.shape(x)[1:3], [height, width]))
        x = tf.cond(same, lambda: x, lambda: tf.image.resize(
            x, (height, width), method="bilinear", antialias=True))
    x = tf.ensure_shape(x, [None, height, width, channels])
    return x[0] if single else x
