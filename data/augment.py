"""The pretraining augmentations (`Augment`), one image at a time, with stateless seeds.

Every random choice is a function of the seeds it is given, so a stream built from them is a
function of (seed, epoch, index) and resumes exactly (data/pretrain.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from data import CROPS, DataError
from data.images import decode_jpeg_window, decode_pixels, to_channels


@dataclass(frozen=True)
class Augment:
    """Random crop and flip (NAT Sec. 3.3; SC Sec. 5 "mild data augmentations").

    crop: "pad" pads `pad` pixels (edge reflection) and cuts a random H x W window, i.e. a
      random translation of up to `pad` pixels; "resize" cuts a random box of `min_scale`..1 of
      the area with aspect ratio 3/4..4/3 and resizes it to H x W; "short_side" scales the
      image (bilinear, antialiased) so that its shorter side is `short_side` pixels, then cuts
      a uniformly placed H x W window (the AlexNet crop of Krizhevsky et al. 2012 and of the
      released NAT code: 256, then 224); "none" keeps the image (a folder or ImageNet image is
      centre-cropped to a square and resized).
    flip: random horizontal mirroring with probability 1/2.
    fused: for a resized crop of an encoded image (a folder, imagenet2012), JPEG files decode
      only the box (`data.images.decode_jpeg_window`); other formats, or fused=False, decode
      the whole file and slice the box. The pixels are the same either way; fused=False is
      there to measure the difference (benchmarks/input_pipeline.py).
    """

    crop: str = "pad"
    pad: int = 2
    min_scale: float = 0.35
    short_side: int = 256
    flip: bool = False
    fused: bool = True

    def __post_init__(self):
        if self.crop not in CROPS:
            raise DataError(f"unknown crop {self.crop!r}; choose one of {', '.join(CROPS)}")
        if self.pad < 0 or not 0.0 < self.min_scale <= 1.0 or self.short_side < 1:
            raise DataError(f"bad augmentation: pad={self.pad}, min_scale={self.min_scale}, "
                            f"short_side={self.short_side}")



def translate_and_flip(image: tf.Tensor, pad: int, flip: bool, crop_seed: tf.Tensor,
                       flip_seed: tf.Tensor) -> tf.Tensor:
    """[H, W, C] -> [H, W, C]: a random translation by up to `pad` pixels in each axis
    (reflect padding, then a random H x W crop; SC Sec. 5's "small translations") and, if
    `flip`, a left-right mirror with probability 1/2. The seeds are stateless seeds [2]."""
    if pad > 0:
        shape = tf.shape(image)
        padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        image = tf.image.stateless_random_crop(padded, shape, crop_seed)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return image


def scale_short_side(image: tf.Tensor, side: int) -> tf.Tensor:
    """[h, w, C] -> [round(h s / m), round(w s / m), C] with m = min(h, w), s = side."""
    shape = tf.cast(tf.shape(image)[:2], tf.float64)
    size = tf.cast(tf.round(shape * (side / tf.reduce_min(shape))), tf.int32)
    return tf.image.resize(image, tf.maximum(size, side), antialias=True)


def crop_box(shape: tf.Tensor, seed: tf.Tensor, augment: Augment
             ) -> tuple[tf.Tensor, tf.Tensor]:
    """(begin, size), int32 [3] each: a random box of `min_scale`..1 of the area of an image
    of `shape` [h, w, c], aspect ratio 3/4..4/3, a function of the stateless `seed` alone."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.zeros([1, 0, 4]), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(augment.min_scale, 1.0),
        use_image_if_no_bounding_boxes=True)
    return begin, size


def resized_crop_of_file(data: tf.Tensor, seed: tf.Tensor, augment: Augment,
                         input_shape: tuple[int, int, int]) -> tf.Tensor:
    """An encoded image's resized crop, float32 [H, W, C] in [0, 1]: the box of `crop_box`
    (on [h, w, 3]) cut from the uint8 pixels, resized, divided by 255 and given C channels.
    JPEG bytes (known by their first bytes, whatever the file name) decode only the box when
    `augment.fused`; the pixels are the same (`data.images.decode_jpeg_window`)."""
    height, width, channels = input_shape

    def whole():
        pixels = decode_pixels(data)
        begin, size = crop_box(tf.shape(pixels), seed, augment)
        return tf.slice(pixels, begin, size)

    def window():
        shape = tf.io.extract_jpeg_shape(data)
        begin, size = crop_box(tf.concat([shape[:2], [3]], 0), seed, augment)
        return decode_jpeg_window(data, begin, size)

    crop = tf.cond(tf.io.is_jpeg(data), window, whole) if augment.fused else whole()
    image = tf.image.resize(crop, (height, width), antialias=True) / 255.0
    return to_channels(image, channels)
