"""Pretraining data: streams of `(index, image)` with a stable index in [0, n).

NAT keeps one target per image, so every image carries its position `index` in a fixed order of
the dataset; SC ignores it. Sources (`open_source`):

    digits          the train split of scikit-learn's bundled 8x8 digits (1198 images,
                    data/digits.py), embedded: no download, no files
    mnist           tfds `mnist`, split `train` (60000)
    cifar10         tfds `cifar10`, split `train` (50000)
    stl10           tfds `stl10`, split `unlabelled+train` (105000; SC Sec. 5.1)
    imagenet2012    tfds `imagenet2012`, split `train` (1281167), built from `manual_dir`
    folder:<path>   every image file under <path>, recursively, in sorted path order

Images are float32 in [0, 1] at the model's input shape (H, W, C), by the rule of
`data.images`. Folder images are checked once when the source is opened: files that cannot be
decoded (corrupt, truncated, not images) are skipped, counted and listed in
`PretrainSource.skipped`.

The stream (`pretrain_dataset`), per input pipeline (one per worker under tf.distribute):

    elements -> shard(pipelines) -> per epoch e: shuffle(seed, e) -> decode -> augment(seed, e,
    index) -> batch(per-replica batch, drop_remainder) -> take(batches of one epoch) -> the
    run's epochs one after the other -> prefetch

For a resized crop (`Augment(crop="resize")`, the ImageNet setting) of a source of encoded
files (a folder, imagenet2012), decoding and cropping are one step: the box is drawn from the
image size in the JPEG header and only that window is decoded (`tf.io.decode_and_crop_jpeg`),
with the same pixels as decoding the whole file; PNG and other formats are decoded whole.
(What it saves is measured, and small, in `data.images.decode_jpeg_window`.)

The shuffle is stateless: blocks of SHUFFLE_BUFFER consecutive elements are permuted by keys
drawn from (seed, epoch, block), which is a uniform permutation of the whole dataset when it
fits in one block (digits, small folders); larger datasets also pass through a shuffle buffer
of that size to mix across blocks.

Batching happens inside an epoch and epochs are concatenated after it, so a batch never holds
an index twice. Every epoch has exactly `steps_per_epoch * replicas_per_pipeline` batches on
every pipeline, so a global step never straddles two epochs. The order and the augmentation
are functions of (seed, epoch, index): a resumed run skips the batches already done in its
epoch and continues with the same stream.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from data import CROPS, PRETRAIN_DATASETS, digits
from data.images import (
    IMAGE_EXTENSIONS,
    decode_image,
    decode_jpeg_window,
    decode_pixels,
    list_images,
    resize_to_input,
    to_channels,
)

TFDS_PRETRAIN_SPLIT = {
    "mnist": "train",
    "cifar10": "train",
    "stl10": "unlabelled+train",
    "imagenet2012": "train",
}
SHUFFLE_BUFFER = 16384


class DataError(ValueError):
    """A dataset cannot be used as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Augment:
    """Random crop and flip (NAT Sec. 3.3; SC Sec. 5 "mild data augmentations").

    crop: "pad" pads `pad` pixels (edge reflection) and cuts a random H x W window, i.e. a
      random translation of up to `pad` pixels; "resize" cuts a random box of `min_scale`..1 of
      the area with aspect ratio 3/4..4/3 and resizes it to H x W (bilinear, antialiased);
      "none" keeps the image.
    flip: random horizontal mirroring with probability 1/2.
    fused: for a resized crop of an encoded image (a folder, imagenet2012), JPEG files decode
      only the box (`data.images.decode_jpeg_window`); other formats, or fused=False, decode
      the whole file and slice the box. The pixels are the same either way; fused=False is
      there to measure the difference (benchmarks/input_pipeline.py).
    """

    crop: str = "pad"
    pad: int = 2
    min_scale: float = 0.35
    flip: bool = False
    fused: bool = True

    def __post_init__(self):
        if self.crop not in CROPS:
            raise DataError(f"unknown crop {self.crop!r}; choose one of {', '.join(CROPS)}")
        if self.pad < 0 or not 0.0 < self.min_scale <= 1.0:
            raise DataError(f"bad augmentation: pad={self.pad}, min_scale={self.min_scale}")


@dataclass(frozen=True)
class PretrainSource:
    """An opened pretraining dataset.

    elements: () -> unbatched Dataset of (index int64, raw), in a fixed order.
    decode: raw -> float32 [h, w, C] in [0, 1] (any h, w).
    fixed_size: decoded images already have the model's H x W.
    skipped: folder files that could not be decoded.
    paths: for a folder, `paths[i]` is the file of index i.
    read: for sources of encoded files (a folder, imagenet2012), raw -> the file's bytes, of
      which `decode` is the zoo's decoding; a resized crop then decodes only its box.
    """

    name: str
    num_examples: int
    input_shape: tuple[int, int, int]
    elements: Callable[[], tf.data.Dataset]
    decode: Callable[[tf.Tensor], tf.Tensor]
    fixed_size: bool
    skipped: tuple[str, ...] = field(default=())
    paths: tuple[str, ...] = field(default=())  # folder: the file of each index
    read: Callable[[tf.Tensor], tf.Tensor] | None = None


def _digits(input_shape) -> PretrainSource:
    images, _ = digits.split_arrays("train")
    resized = resize_to_input(images, input_shape).numpy()
    n = len(resized)

    def elements():
        return tf.data.Dataset.from_tensor_slices((np.arange(n, dtype=np.int64), resized))

    return PretrainSource("digits", n, input_shape, elements, lambda x: x, fixed_size=True)


def _tfds(name: str, input_shape, data_dir, manual_dir) -> PretrainSource:
    import tensorflow_datasets as tfds

    split = TFDS_PRETRAIN_SPLIT[name]
    builder = tfds.builder(name, data_dir=data_dir)
    decoders = {"image": tfds.decode.SkipDecoding()}
    try:
        raw = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
    except AssertionError:  # tfds' way of saying that the data was never generated
        suffix = f" --data_dir={data_dir}" if data_dir else ""
        if name == "imagenet2012":
            where = manual_dir or "<manual_dir>"
            raise DataError(
                f"dataset imagenet2012 is not prepared in {builder.data_dir}: put "
                f"ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {where} and run "
                f"`tfds build imagenet2012 --manual_dir={where}{suffix}`") from None
        raise DataError(f"dataset {name} is not prepared in {builder.data_dir}: run `tfds build "
                        f"{name}{suffix}` on a machine with network access") from None
    if builder.info.splits:
        n = int(builder.info.splits[split].num_examples)
    else:  # data without split metadata (e.g. generated for tests): count the records once
        n = int(raw.reduce(np.int64(0), lambda count, _: count + 1))
    channels = input_shape[-1]
    fixed = name != "imagenet2012"

    def elements():
        ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
        return ds.enumerate().map(lambda i, ex: (i, ex["image"]))

    def decode(raw):
        image = decode_image(raw)
        return resize_to_input(image, input_shape) if fixed else to_channels(image, channels)

    return PretrainSource(name, n, input_shape, elements, decode, fixed_size=fixed,
                          read=None if fixed else tf.identity)


def _readable(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # decodes everything: catches truncated files too
        raw = tf.io.read_file(path)
        tf.io.decode_image(raw, expand_animations=False)
        return True
    except Exception:  # any failure means the file is skipped, and listed
        return False


def _folder(root: str, input_shape) -> PretrainSource:
    if not os.path.isdir(root):
        raise DataError(f"dataset folder:{root}: no such directory")
    candidates = list_images(root)
    with ThreadPoolExecutor(max_workers=8) as pool:
        ok = list(pool.map(_readable, candidates))
    paths = [p for p, good in zip(candidates, ok, strict=True) if good]
    skipped = tuple(p for p, good in zip(candidates, ok, strict=True) if not good)
    if not paths:
        raise DataError(f"dataset folder:{root}: no readable image "
                        f"({', '.join(IMAGE_EXTENSIONS)}) under it"
                        f"{f'; {len(skipped)} unreadable files skipped' if skipped else ''}")
    channels = input_shape[-1]

    def elements():
        return tf.data.Dataset.from_tensor_slices(
            (np.arange(len(paths), dtype=np.int64), np.asarray(paths)))

    def decode(path):
        return to_channels(decode_image(tf.io.read_file(path)), channels)

    return PretrainSource(f"folder:{root}", len(paths), input_shape, elements, decode,
                          fixed_size=False, skipped=skipped, paths=tuple(paths),
                          read=tf.io.read_file)


def open_source(name: str, input_shape: tuple[int, int, int], data_dir: str | None = None,
                manual_dir: str | None = None) -> PretrainSource:
    """Open the pretraining dataset `name` (see the module docstring) for a model input shape.

    Raises DataError with a one-line message for an unknown name, unprepared tfds data (naming
    the command to run) or a folder without readable images.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if name == "digits":
        return _digits(input_shape)
    if name in TFDS_PRETRAIN_SPLIT:
        return _tfds(name, input_shape, data_dir, manual_dir)
    if name.startswith("folder:"):
        return _folder(name[len("folder:"):], input_shape)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(PRETRAIN_DATASETS)}")


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


def _crop_box(shape: tf.Tensor, seed: tf.Tensor, augment: Augment
              ) -> tuple[tf.Tensor, tf.Tensor]:
    """(begin, size), int32 [3] each: a random box of `min_scale`..1 of the area of an image
    of `shape` [h, w, c], aspect ratio 3/4..4/3, a function of the stateless `seed` alone."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.zeros([1, 0, 4]), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(augment.min_scale, 1.0),
        use_image_if_no_bounding_boxes=True)
    return begin, size


def _resized_crop_of_file(data: tf.Tensor, seed: tf.Tensor, source: PretrainSource,
                          augment: Augment) -> tf.Tensor:
    """An encoded image's resized crop, float32 [H, W, C] in [0, 1]: the box of `_crop_box`
    (on [h, w, 3]) cut from the uint8 pixels, resized, divided by 255 and given C channels.
    JPEG bytes (known by their first bytes, whatever the file name) decode only the box when
    `augment.fused`; the pixels are the same (`data.images.decode_jpeg_window`)."""
    height, width, channels = source.input_shape

    def whole():
        pixels = decode_pixels(data)
        begin, size = _crop_box(tf.shape(pixels), seed, augment)
        return tf.slice(pixels, begin, size)

    def window():
        shape = tf.io.extract_jpeg_shape(data)
        begin, size = _crop_box(tf.concat([shape[:2], [3]], 0), seed, augment)
        return decode_jpeg_window(data, begin, size)

    crop = tf.cond(tf.io.is_jpeg(data), window, whole) if augment.fused else whole()
    image = tf.image.resize(crop, (height, width), antialias=True) / 255.0
    return to_channels(image, channels)


def _augment(raw: tf.Tensor, seed: tf.Tensor, source: PretrainSource, augment: Augment
             ) -> tf.Tensor:
    """One example, decoded from `raw` and augmented; `seed` is an int64 [2] stateless seed."""
    height, width, _ = source.input_shape
    seeds = tf.random.experimental.stateless_split(seed, 3)
    if augment.crop == "resize" and source.read is not None:
        image = _resized_crop_of_file(source.read(raw), seeds[0], source, augment)
    elif augment.crop == "resize":
        image = source.decode(raw)
        begin, size = _crop_box(tf.shape(image), seeds[0], augment)
        image = tf.image.resize(tf.slice(image, begin, size), (height, width), antialias=True)
    else:
        image = source.decode(raw)
        if not source.fixed_size:
            image = resize_to_input(image, source.input_shape, center_crop=True)
    pad = augment.pad if augment.crop == "pad" else 0
    image = translate_and_flip(image, pad, augment.flip, seeds[1], seeds[2])
    image.set_shape(source.input_shape)
    return image


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Global steps in one epoch: full global batches only (the remainder is dropped)."""
    return num_examples // global_batch


def _shuffled(elements: tf.data.Dataset, seed: int, epoch: tf.Tensor, size: int
              ) -> tf.data.Dataset:
    """The (index, raw) elements of one epoch in the order of (seed, epoch) (module docstring).
    `size` is the number of elements."""
    base_seed = tf.constant(seed, tf.int64) * 1_000_003 + epoch

    def permute_block(index, raw):
        # A stateless permutation of a block of consecutive elements, seeded by (seed, epoch,
        # the block's first index): the order is a function of those alone.
        keys = tf.random.stateless_uniform(tf.shape(index), tf.stack([base_seed, index[0]]))
        order = tf.argsort(keys)
        return tf.gather(index, order), tf.gather(raw, order)

    ds = elements.batch(SHUFFLE_BUFFER).map(permute_block).unbatch()
    if size > SHUFFLE_BUFFER:
        # Mixes across block boundaries; its input differs every epoch, so its fixed seed still
        # gives a new order each epoch.
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed % 2**31, reshuffle_each_iteration=False)
    return ds


def pretrain_dataset(source: PretrainSource, global_batch: int, augment: Augment, seed: int,
                     epochs: int, start_step: int = 0,
                     input_context: tf.distribute.InputContext | None = None
                     ) -> tf.data.Dataset:
    """The per-replica stream of (index int32 [b], images float32 [b, H, W, C]) of `epochs`
    epochs.

    Args:
      source: an opened PretrainSource.
      global_batch: the global batch size B; each replica gets B / replicas.
      augment: the augmentation.
      seed: the run's seed; shuffling and augmentation are functions of (seed, epoch, index).
      epochs: the epochs of the whole run; the stream ends after the last one.
      start_step: global steps already done (a resumed run starts after them).
      input_context: from `distribute_datasets_from_function` (None: one pipeline, one replica).

    Raises DataError when the dataset holds less than one global batch or the batch does not
    split evenly over the replicas.
    """
    pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    replicas = input_context.num_replicas_in_sync if input_context else 1
    if global_batch % replicas:
        raise DataError(f"batch_size {global_batch} is not divisible by the {replicas} replicas")
    per_replica = global_batch // replicas
    steps = steps_per_epoch(source.num_examples, global_batch)
    if steps < 1:
        raise DataError(f"dataset {source.name} has {source.num_examples} images, fewer than "
                        f"one batch of {global_batch}")
    batches_per_epoch = steps * (replicas // pipelines)
    start_epoch, done_in_epoch = divmod(int(start_step), steps)
    shard_size = source.num_examples // pipelines
    elements = source.elements().shard(pipelines, pipeline_id)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        def prepare(index, raw):
            example_seed = tf.stack([tf.constant(seed, tf.int64),
                                     epoch * source.num_examples + index])
            image = _augment(raw, example_seed, source, augment)
            return tf.cast(index, tf.int32), image

        ds = (_shuffled(elements, seed, epoch, shard_size)
              .map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
              .batch(per_replica, drop_remainder=True)
              .take(batches_per_epoch))
        # The first epoch of a resumed run skips the batches done before the interruption.
        first = tf.cast(tf.equal(epoch, start_epoch), tf.int64)
        return ds.skip(first * done_in_epoch * (replicas // pipelines))

    ds = tf.data.Dataset.range(start_epoch, epochs).flat_map(one_epoch)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
