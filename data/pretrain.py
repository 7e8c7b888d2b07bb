"""Pretraining data: streams of `(index, image)` with a stable index in [0, n).

NAT keeps one target per image, so every image carries its position `index` in a fixed order of
the dataset; SC ignores it. Sources (`open_source`):

    digits          the train split of scikit-learn's bundled 8x8 digits (1198 images,
                    data/digits.py), embedded: no download, no files
    mnist           tfds `mnist`, split `train` (60000)
    fashion_mnist   tfds `fashion_mnist`, split `train` (60000); prepared offline from the
                    Debian package dataset-fashion-mnist when missing (data.fashion_mnist)
    cifar10         tfds `cifar10`, split `train` (50000)
    stl10           tfds `stl10`, split `unlabelled+train` (105000; SC Sec. 5.1)
    imagenet2012    tfds `imagenet2012`, split `train` (1281167), built from `manual_dir`
    folder:<path>   every image file under <path>, recursively, in sorted path order

Images are float32 in [0, 1] at the model's input shape (H, W, C), by the rule of
`data.images`. Folder images are checked once when the source is opened: files that cannot be
decoded (corrupt, truncated, not images) are left out and listed with their reasons in
`PretrainSource.skipped`. A run records the files it uses (index i is line i) and reopens
the folder from that list (`open_source(..., files=...)`), so its indices never move.

A folder can still change during a run. Its files are read and decoded at training time
through `PretrainSource.load`, which never raises: a file that is gone or no longer decodes
is dropped from the stream, recorded with its reason in `PretrainSource.failures`, and the
batch is REFILLED with the next images of the epoch's order (each epoch's order repeats after
its end, which always holds enough images). Every replica's batch keeps B / replicas images,
so the cross-replica collectives (BN statistics, SC contrasts, NAT's global scope) always
match and the loss keeps its normalisation; each pipeline refills from its own shard. The
indices of a global batch stay distinct (the refill comes from the rest of the epoch, then
from its first batches). The stream stays a function of (seed, epoch, index) and of the set
of unreadable files: a run resumes exactly as long as the same files fail.

For a resized crop (`Augment(crop="resize")`, the ImageNet setting) of imagenet2012, only the
box drawn from the JPEG header's size is decoded (`tf.io.decode_and_crop_jpeg`; the same
pixels, a small saving: `data.images.decode_jpeg_window`); other formats are decoded whole. A
folder's files go through the guarded loader above, a Python function per file that decodes
whole files, at about half the graph's rate (benchmarks/input_pipeline.py).

The stream (`pretrain_dataset`), per input pipeline (one per worker under tf.distribute):

    per epoch e: order(seed, e) -> shard(pipelines) -> decode -> augment(seed, e, index) ->
    batch(per-replica batch, drop_remainder) -> take(batches of one epoch) -> the run's epochs
    one after the other -> prefetch

The order of epoch e (data.order) is a uniform permutation of ALL the indices [0, n) for
sources fetched by index (`PretrainSource.gather`: digits, folders), whatever the order
of their listing; pipeline p of P takes its positions p, p + P, ..., so the shards are
disjoint and differ every epoch. The tfds sources, streamed from their record files, keep a
block shuffle of every P-th element.

Batching happens inside an epoch and epochs are concatenated after it, so a batch never holds
an index twice. Every epoch has exactly `steps_per_epoch * replicas_per_pipeline` batches on
every pipeline, so a global step never straddles two epochs. The order and the augmentation
are functions of (seed, epoch, index): a resumed run skips the batches already done in its
epoch and continues with the same stream (also on tf.data service workers: data/service.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from data import PRETRAIN_DATASETS, DataError, digits, order, prepared
from data.augment import (
    Augment,
    crop_box,
    resized_crop_of_file,
    scale_short_side,
    translate_and_flip,
)
from data.images import IMAGE_EXTENSIONS, decode_image, list_images, resize_to_input, to_channels

TFDS_PRETRAIN_SPLIT = {
    "mnist": "train",
    "fashion_mnist": "train",
    "cifar10": "train",
    "stl10": "unlabelled+train",
    "imagenet2012": "train",
}
GATHER_BATCH = 256


class SkipLog:
    """Files that failed to load during training, each with its first reason. The input
    pipeline's threads add to it; the training loop drains what is new."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._new: list[tuple[str, str]] = []

    def add(self, path: str, reason: str) -> None:
        with self._lock:
            if path not in self._seen:
                self._seen.add(path)
                self._new.append((path, reason))

    def drain(self) -> list[tuple[str, str]]:
        """(path, reason) of the files that failed since the last call."""
        with self._lock:
            new, self._new = self._new, []
        return new


@dataclass(frozen=True)
class PretrainSource:
    """An opened pretraining dataset.

    elements: () -> unbatched Dataset of (index int64, raw), in a fixed order.
    gather: indices int64 [k] -> their raw [k, ...], for sources fetched by index (digits,
      folders): their epochs are permutations of all indices (module docstring). It must agree
      with `elements`: a copy that replaces one replaces both. None: streamed from `elements`.
    decode: raw -> float32 [h, w, C] in [0, 1] (any h, w).
    fixed_size: decoded images already have the model's H x W.
    skipped: (path, reason) of the folder files left out when the folder was scanned.
    paths: for a folder, `paths[i]` is the file of index i; `root` is the folder.
    encoded: raw is an image file's bytes (imagenet2012), so that a resized crop can decode
      only its box.
    load: for sources whose files may fail at training time (folders): (raw, seed, decoder)
      -> (float32 [h, w, C], ok bool), never raising, where decoder(file bytes, seed) decodes;
      a failure is added to `failures` (module docstring). None: `decode` cannot fail.
    """

    name: str
    num_examples: int
    input_shape: tuple[int, int, int]
    elements: Callable[[], tf.data.Dataset]
    decode: Callable[[tf.Tensor], tf.Tensor]
    fixed_size: bool
    skipped: tuple[tuple[str, str], ...] = field(default=())
    paths: tuple[str, ...] = field(default=())
    root: str = ""
    encoded: bool = False
    load: Callable[[tf.Tensor, tf.Tensor, Callable], tuple[tf.Tensor, tf.Tensor]] | None = None
    failures: SkipLog | None = None
    gather: Callable[[tf.Tensor], tf.Tensor] | None = None


def _host_table(values) -> tf.Tensor:
    """`values` as a tensor in host memory, for `PretrainSource.gather` to capture: a NumPy
    array would become a constant of the gather's function, which took 8x its CPU time per
    epoch at ImageNet's size (benchmarks/shuffle_mixing.py)."""
    with tf.device("/cpu:0"):
        return tf.constant(values)


def _digits(input_shape) -> PretrainSource:
    images, _ = digits.split_arrays("train")
    resized = resize_to_input(images, input_shape).numpy()
    n = len(resized)
    table = _host_table(resized)

    def elements():
        return tf.data.Dataset.from_tensor_slices((np.arange(n, dtype=np.int64), resized))

    return PretrainSource("digits", n, input_shape, elements, lambda x: x, fixed_size=True,
                          gather=lambda indices: tf.gather(table, indices))


def _tfds(name: str, input_shape, data_dir, manual_dir) -> PretrainSource:
    split = TFDS_PRETRAIN_SPLIT[name]
    decoders = {"image": tfds.decode.SkipDecoding()}
    builder, raw = prepared.tfds_split(name, split, data_dir, manual_dir, decoders)
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
                          encoded=not fixed)


def load_file(path: str) -> tuple[tf.Tensor | None, str]:
    """(float32 [h, w, 3] in [0, 1], "") for an image file, or (None, why it cannot be used)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as error:
        return None, f"cannot read: {error.strerror or error}"
    try:
        return decode_image(tf.constant(raw)), ""
    except tf.errors.OpError as error:
        return None, _decoder_error(error)


def _decoder_error(error: tf.errors.OpError) -> str:
    """The decoder's own words: eager messages wrap them in op details."""
    text = re.sub(r"\{\{function_node [^}]*\}\}|\[Op:.*$", "", str(error.message))
    return " ".join(text.split("\n")[0].split()) or "cannot decode"


def _unreadable(path: str) -> str:
    """Why the scan leaves `path` out ("" if it is readable)."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes everything: catches truncated files too
    except Exception as error:  # any failure means the file is left out, with its reason
        return " ".join(str(error).split()) or type(error).__name__
    return load_file(path)[1]


def _folder(root: str, input_shape, files: Sequence[str] | None) -> PretrainSource:
    if not os.path.isdir(root):
        raise DataError(f"dataset folder:{root}: no such directory")
    skipped: tuple[tuple[str, str], ...] = ()
    if files is not None:  # the run's own list: no scan, the indices stay where they were
        paths = [os.path.join(root, f) for f in files]
    else:
        candidates = list_images(root)
        with ThreadPoolExecutor(max_workers=8) as pool:
            reasons = list(pool.map(_unreadable, candidates))
        paths = [p for p, why in zip(candidates, reasons, strict=True) if not why]
        skipped = tuple((p, why) for p, why in zip(candidates, reasons, strict=True) if why)
    if not paths:
        raise DataError(f"dataset folder:{root}: no readable image "
                        f"({', '.join(IMAGE_EXTENSIONS)}) under it"
                        f"{f'; {len(skipped)} unreadable files skipped' if skipped else ''}")
    channels = input_shape[-1]
    failures = SkipLog()
    table = _host_table(paths)

    def elements():
        return tf.data.Dataset.from_tensor_slices(
            (np.arange(len(paths), dtype=np.int64), np.asarray(paths)))

    def decode(path):
        return to_channels(decode_image(tf.io.read_file(path)), channels)

    def fetch(path, seed, decoder):
        name = path.numpy().decode()
        try:
            with open(name, "rb") as f:
                raw = f.read()
            return decoder(tf.constant(raw), seed), True
        except OSError as error:
            failures.add(name, f"cannot read: {error.strerror or error}")
        except tf.errors.OpError as error:
            failures.add(name, _decoder_error(error))
        return tf.zeros([1, 1, channels]), False

    def load(path, seed, decoder):
        # Python, so that a failure is caught and named instead of ending the input pipeline.
        image, ok = tf.py_function(lambda p, s: fetch(p, s, decoder), [path, seed],
                                   [tf.float32, tf.bool])
        return tf.ensure_shape(image, [None, None, channels]), tf.ensure_shape(ok, [])

    return PretrainSource(f"folder:{root}", len(paths), input_shape, elements, decode,
                          fixed_size=False, skipped=skipped, paths=tuple(paths), root=root,
                          load=load, failures=failures,
                          gather=lambda indices: tf.gather(table, indices))


def open_source(name: str, input_shape: tuple[int, int, int], data_dir: str | None = None,
                manual_dir: str | None = None, files: Sequence[str] | None = None
                ) -> PretrainSource:
    """Open the pretraining dataset `name` (see the module docstring) for a model input shape.

    `files`: for a folder, the paths (relative to it) a run recorded, in index order; the
    folder is then not scanned.

    Raises DataError with a one-line message for an unknown name, unprepared tfds data (naming
    the command to run) or a folder without readable images.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if name == "digits":
        return _digits(input_shape)
    if name in TFDS_PRETRAIN_SPLIT:
        return _tfds(name, input_shape, data_dir, manual_dir)
    if name.startswith("folder:"):
        return _folder(name[len("folder:"):], input_shape, files)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(PRETRAIN_DATASETS)}")


def _decoded(raw: tf.Tensor, seed: tf.Tensor, source: PretrainSource, augment: Augment
             ) -> tuple[tf.Tensor, tf.Tensor]:
    """(float32 [h, w, C], ok): one example decoded, and already cut and resized for
    crop="resize" (whose box is drawn from `seed`); ok is False for a folder file that failed
    (`PretrainSource.load`)."""
    resize = augment.crop == "resize"

    def decoder(crop: Augment):
        def decode_file(data, crop_seed):
            if resize:
                return resized_crop_of_file(data, crop_seed, crop, source.input_shape)
            return to_channels(decode_image(data), source.input_shape[-1])
        return decode_file

    if source.load is not None:
        # The guarded loader decodes eagerly, where the window's extra ops cost more than the
        # rows they save (benchmarks/input_pipeline.py): whole files there.
        return source.load(raw, seed, decoder(dataclasses.replace(augment, fused=False)))
    if source.encoded:
        return decoder(augment)(raw, seed), tf.constant(True)
    image = source.decode(raw)
    if resize:
        begin, size = crop_box(tf.shape(image), seed, augment)
        image = tf.image.resize(tf.slice(image, begin, size), source.input_shape[:2],
                                antialias=True)
    return image, tf.constant(True)


def example_seeds(seed: int, epoch: tf.Tensor, num_examples: int, index: tf.Tensor
                  ) -> tf.Tensor:
    """int64 [3, 2]: the stateless seeds of example `index` in `epoch` of a run seeded `seed`
    (the resized crop's box, the other crops, the flip)."""
    return tf.random.experimental.stateless_split(
        tf.stack([tf.constant(seed, tf.int64), epoch * num_examples + index]), 3)


def augmented_example(raw: tf.Tensor, seeds: tf.Tensor, source: PretrainSource,
                      augment: Augment) -> tf.Tensor:
    """One example decoded and augmented with its `example_seeds`, without the drop of a file
    that failed (what a tf.data service worker computes: data/service.py)."""
    image, _ = _decoded(raw, seeds[0], source, augment)
    return _augment(image, seeds, source, augment)


def _augment(image: tf.Tensor, seeds: tf.Tensor, source: PretrainSource, augment: Augment
             ) -> tf.Tensor:
    """The rest of one example's augmentation after `_decoded`; `seeds` are int64 [3, 2]
    stateless seeds (the first drew the resized crop's box)."""
    if augment.crop == "short_side":
        image = tf.image.stateless_random_crop(scale_short_side(image, augment.short_side),
                                               source.input_shape, seeds[1])
    elif augment.crop != "resize" and not source.fixed_size:
        image = resize_to_input(image, source.input_shape, center_crop=True)
    pad = augment.pad if augment.crop == "pad" else 0
    image = translate_and_flip(image, pad, augment.flip, seeds[1], seeds[2])
    image.set_shape(source.input_shape)
    return image


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Global steps in one epoch: full global batches only (the remainder is dropped)."""
    return num_examples // global_batch


def epoch_elements(source: PretrainSource, seed: int, pipelines: int = 1, pipeline_id: int = 0
                   ) -> Callable[[tf.Tensor], tf.data.Dataset]:
    """epoch -> the (index int64, raw) elements of input pipeline `pipeline_id` of
    `pipelines` in that epoch, in its order (module docstring): positions pipeline_id,
    pipeline_id + pipelines, ... of a permutation of all indices when the source has
    `gather`, else every pipelines-th element of the stream, block-shuffled."""
    if source.gather is None:
        elements = source.elements().shard(pipelines, pipeline_id)
        size = source.num_examples // pipelines
        return lambda epoch: order.block_shuffled(elements, seed, epoch, size)

    def permuted(epoch: tf.Tensor) -> tf.data.Dataset:
        indices = order.permutation(source.num_examples, seed, epoch)[pipeline_id::pipelines]
        # Fetched GATHER_BATCH at a time: one tf.data call per index would cost more than
        # the gather itself.
        return (tf.data.Dataset.from_tensor_slices(indices).batch(GATHER_BATCH)
                .map(lambda batch: (batch, source.gather(batch))).unbatch())

    return permuted


def _prepared(ds: tf.data.Dataset, source: PretrainSource, augment: Augment,
              seeds: Callable[[tf.Tensor], tf.Tensor]) -> tf.data.Dataset:
    """(index, raw) -> (index int32, augmented image), `seeds(index)` giving the example's
    [3, 2] stateless seeds. Where files can fail (`source.load`), those that do are dropped
    and the epoch's order repeats to refill (module docstring)."""
    parallel = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def decoded(index, raw):
        example_seeds = seeds(index)  # drawn once per example, for the crop and the rest
        return (index, example_seeds, *_decoded(raw, example_seeds[0], source, augment))

    def finish(index, example_seeds, image, ok):
        return tf.cast(index, tf.int32), _augment(image, example_seeds, source, augment)

    ds = ds.map(decoded, **parallel)
    if source.load is None:
        return ds.map(finish, **parallel)
    return (ds.filter(lambda index, example_seeds, image, ok: ok)
            .map(finish, **parallel)
            .repeat())


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
    if augment.crop == "short_side" and augment.short_side < max(source.input_shape[:2]):
        raise DataError(f"crop short_side={augment.short_side} is smaller than the input "
                        f"{source.input_shape[0]}x{source.input_shape[1]}")
    batches_per_epoch = steps * (replicas // pipelines)
    start_epoch, done_in_epoch = divmod(int(start_step), steps)
    elements = epoch_elements(source, seed, pipelines, pipeline_id)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        def seeds(index):
            return example_seeds(seed, epoch, source.num_examples, index)

        ds = _prepared(elements(epoch), source, augment, seeds)
        ds = ds.batch(per_replica, drop_remainder=True).take(batches_per_epoch)
        # The first epoch of a resumed run skips the batches done before the interruption.
        first = tf.cast(tf.equal(epoch, start_epoch), tf.int64)
        return ds.skip(first * done_in_epoch * (replicas // pipelines))

    ds = tf.data.Dataset.range(start_epoch, epochs).flat_map(one_epoch)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
