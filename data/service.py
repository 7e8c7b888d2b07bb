"""The pretraining stream decoded on tf.data service workers, batch for batch the local one.

`service_dataset(service, ...)` takes the arguments of `data.pretrain.pretrain_dataset` and
yields the same elements in the same order, bit for bit, while the decoding and augmentation
run on the workers of a tf.data service (`tf.data.experimental.service`) whose dispatcher is
at `service` ("grpc://HOST:PORT"; `python -m train.data_service` starts one).

Why not one of the service's own orders. With ShardingPolicy.OFF every worker produces the
whole stream; DYNAMIC hands splits of the source to whichever worker asks, and the client
receives their elements first come, first served. Neither gives an order, and the model must
see batch k at step k. So the protocol is:

- Static sharding by hint (ShardingPolicy.HINT; the dispatcher lists its workers, see
  train/data_service.py). Each of the W workers learns its index w and W from the range
  it is given by `shard(SHARD_HINT, SHARD_HINT)` (its first two elements are w and w + W).
- On every worker, the pipeline's order is computed as locally (`pretrain_dataset`'s
  shuffle, shard over input pipelines, per-replica batches, the epoch's `take`, the resume's
  `skip`) on the raw elements (indices and file bytes or paths, cheap), each per-replica batch
  tagged with its position k in the pipeline's stream (k = step * replicas per pipeline +
  replica, counted from the run's first step). Worker w keeps the batches with k = w mod W and
  only those are decoded and augmented, with the seeds of (seed, epoch, index): the same
  images as locally. After its last batch a worker sends padding (tagged with the k it would
  have next), forever, because coordinated reads need an endless stream.
- The client reads with coordinated reads (`num_consumers=1`): the service hands it one
  element from each worker in turn, in a fixed rotation, so no worker runs ahead of the
  slowest by more than the service's buffers, and each turn of the rotation is one round of W
  consecutive tags (k - start) // W. `group_by_window` puts each round back in k order: at
  most W - 1 batches wait for the rest of their round, and no image is copied (the round's
  window is filtered, not batched). The order does not depend on the rotation: any arrival
  order that keeps each worker's own order is restored. The stream ends after the run's last
  batch: the padding never reaches the model.

Guaranteed: the elements equal those of `pretrain_dataset` with the same arguments, for any
number of workers, input pipelines (`input_context`, each pipeline its own job) and
`start_step`. Not kept: a folder's files are read and decoded in the graph on the workers (no
Python function runs there), so a file that fails mid-run stops the run with its error instead
of being dropped and refilled; a worker lost mid-run stalls the client (static sharding has
no other worker for its batches; restarting it restarts its shard, which is wrong, so restart
the run: it resumes from its last checkpoint). Every worker reads the whole raw stream (for
imagenet2012, every record) and decodes 1 / W of it; workers need the data at the same paths
as the trainer (a shared file system). Images travel as float32.
"""

from __future__ import annotations

import dataclasses
import functools
import uuid

import tensorflow as tf

from data.augment import Augment
from data.pretrain import (
    PretrainSource,
    augmented_example,
    epoch_elements,
    example_seeds,
    pretrain_dataset,
    steps_per_epoch,
)

_ROUND = 1 << 20  # group keys hold (round, W) as round * _ROUND + W; W < _ROUND workers
_NEVER = (1 << 62)  # the padding's k has no end


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The arithmetic of one pipeline's stream (as in `pretrain_dataset`)."""

    per_replica: int
    per_pipeline: int  # replicas of one pipeline
    batches_per_epoch: int
    start_epoch: int
    start_k: int
    end_k: int
    pipelines: int
    pipeline_id: int


def _plan(source: PretrainSource, global_batch: int, epochs: int, start_step: int,
          input_context: tf.distribute.InputContext | None) -> _Plan:
    pipelines = input_context.num_input_pipelines if input_context else 1
    replicas = input_context.num_replicas_in_sync if input_context else 1
    steps = steps_per_epoch(source.num_examples, global_batch)
    per_pipeline = replicas // pipelines
    return _Plan(global_batch // replicas, per_pipeline, steps * per_pipeline,
                 int(start_step) // steps, int(start_step) * per_pipeline,
                 epochs * steps * per_pipeline, pipelines,
                 input_context.input_pipeline_id if input_context else 0)


def _worker_source(source: PretrainSource) -> PretrainSource:
    """`source` with a folder's guarded loader (a Python function) replaced by the same
    decoding in the graph, which a remote worker can run."""
    if source.load is None:
        return source

    def load(path, seed, decoder):
        return decoder(tf.io.read_file(path), seed), tf.constant(True)

    return dataclasses.replace(source, load=load, failures=None)


def _raw_batches(source: PretrainSource, plan: _Plan, seed: int, epochs: int
                 ) -> tf.data.Dataset:
    """(k int64, index int64 [b], raw [b]): the pipeline's per-replica batches before decoding,
    k counted from the run's first step; the order of `pretrain_dataset`."""
    elements = epoch_elements(source, seed, plan.pipelines, plan.pipeline_id)
    done = plan.start_k - plan.start_epoch * plan.batches_per_epoch

    def one_epoch(epoch):
        ds = elements(epoch)
        ds = ds.batch(plan.per_replica, drop_remainder=True).take(plan.batches_per_epoch)
        skipped = tf.cast(tf.equal(epoch, plan.start_epoch), tf.int64) * done
        return ds.skip(skipped).enumerate(epoch * plan.batches_per_epoch + skipped)

    return (tf.data.Dataset.range(plan.start_epoch, epochs).flat_map(one_epoch)
            .map(lambda k, batch: (k, *batch)))


def worker_stream(source: PretrainSource, global_batch: int, augment: Augment, seed: int,
                  epochs: int, start_step: int = 0,
                  input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """What each service worker runs (module docstring): (k int64, W int64, index int32 [b],
    images float32 [b, H, W, C]) for its batches k = w mod W, then padding forever. Only
    meaningful under ShardingPolicy.HINT."""
    source = _worker_source(source)
    plan = _plan(source, global_batch, epochs, start_step, input_context)
    n = source.num_examples
    hint = tf.data.experimental.SHARD_HINT
    me = tf.data.Dataset.range(_NEVER).shard(hint, hint).take(2).batch(2)

    def decode(k, index, raw):
        epoch = k // plan.batches_per_epoch
        seeds = example_seeds(seed, epoch, n, index)
        return k, tf.cast(index, tf.int32), augmented_example(raw, seeds, source, augment)

    def stream(first_two):
        w, workers = first_two[0], first_two[1] - first_two[0]
        mine = _raw_batches(source, plan, seed, epochs).filter(
            lambda k, index, raw: tf.equal(k % workers, w))
        images = (mine.map(lambda k, index, raw: (tf.fill(tf.shape(index), k), index, raw))
                  .unbatch()
                  .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                  .batch(plan.per_replica, drop_remainder=True)
                  .map(lambda k, index, image: (k[0], workers, index, image)))
        spec = images.element_spec
        blank = (tf.zeros(spec[2].shape, tf.int32), tf.zeros(spec[3].shape, tf.float32))
        padding = tf.data.Dataset.range(plan.end_k + (w - plan.end_k) % workers, _NEVER,
                                        workers).map(lambda k: (k, workers, *blank))
        return images.concatenate(padding)

    return me.flat_map(stream)


def _in_step_order(ds: tf.data.Dataset, start_k: int) -> tf.data.Dataset:
    """Each round of W consecutive tags, gathered and emitted in tag order (module
    docstring); the elements keep (k, W, index, images)."""

    def key(k, workers, index, images):
        return (k - start_k) // workers * _ROUND + workers

    def in_order(key, window):
        workers = key % _ROUND
        base = key // _ROUND * workers + start_k
        return tf.data.Dataset.range(workers).flat_map(
            lambda j: window.filter(lambda k, *_: tf.equal(k, base + j)))

    # Plain functions: they need no autograph conversion, and one benchmark process that
    # built several of these streams once failed here with autograph calling `key` with two
    # arguments (not reproduced since).
    plain = tf.autograph.experimental.do_not_convert
    return ds.group_by_window(plain(key), plain(in_order),
                              window_size_func=plain(lambda key: key % _ROUND))


def service_dataset(service: str, source: PretrainSource, global_batch: int, augment: Augment,
                    seed: int, epochs: int, start_step: int = 0,
                    input_context: tf.distribute.InputContext | None = None
                    ) -> tf.data.Dataset:
    """`pretrain_dataset(source, global_batch, augment, seed, epochs, start_step,
    input_context)` with the decoding on the tf.data service at `service`
    ("grpc://HOST:PORT"): the same elements in the same order (module docstring). Iterate it
    once: each call makes a job of its own.

    Raises DataError as `pretrain_dataset` does.
    """
    # the local stream's checks (batch size, dataset size, crop), nothing of it is iterated
    pretrain_dataset(source, global_batch, augment, seed, epochs, start_step, input_context)
    plan = _plan(source, global_batch, epochs, start_step, input_context)
    remote = worker_stream(source, global_batch, augment, seed, epochs, start_step,
                           input_context)
    ds = remote.apply(tf.data.experimental.service.distribute(
        tf.data.experimental.service.ShardingPolicy.HINT, service,
        job_name=f"pretrain-{plan.pipeline_id}-{uuid.uuid4().hex}", consumer_index=0,
        num_consumers=1, target_workers="ANY"))
    ds = _in_step_order(ds, plan.start_k).take(max(plan.end_k - plan.start_k, 0))
    ds = ds.map(lambda k, workers, index, images: (index, images))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def pretrain_stream(service: str, source: PretrainSource, global_batch: int, augment: Augment,
                    seed: int, epochs: int, start_step: int = 0,
                    input_context: tf.distribute.InputContext | None = None
                    ) -> tf.data.Dataset:
    """The pretraining stream, decoded here (`service` '') or on the tf.data service at
    `service` (`service_dataset`): the same elements either way."""
    make = functools.partial(service_dataset, service) if service else pretrain_dataset
    return make(source, global_batch, augment, seed, epochs, start_step, input_context)
