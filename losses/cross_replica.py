"""Cross-replica helpers shared by the losses and the training loop.

Every function here is a no-op outside a `tf.distribute` replica context or with a single
replica, so library code can call them unconditionally: the same code runs on one CPU, on a
MirroredStrategy over several devices, and under MultiWorkerMirroredStrategy.
"""

from __future__ import annotations

import tensorflow as tf


def _replica_context() -> tf.distribute.ReplicaContext | None:
    """The current replica context, or None in a cross-replica context."""
    return tf.distribute.get_replica_context()


def num_replicas() -> int:
    """Number of replicas in sync (1 outside a strategy)."""
    ctx = _replica_context()
    return 1 if ctx is None else ctx.num_replicas_in_sync


def is_distributed() -> bool:
    """True when running inside a replica context with more than one replica."""
    return num_replicas() > 1


def replica_id() -> tf.Tensor:
    """This replica's id as an int32 scalar tensor (0 outside a strategy)."""
    ctx = _replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return tf.constant(0, tf.int32)
    return tf.cast(ctx.replica_id_in_sync_group, tf.int32)


def all_gather(value: tf.Tensor, axis: int = 0) -> tf.Tensor:
    """Concatenate `value` from all replicas along `axis`, in replica order.

    Differentiable: the gradient of a gathered tensor is summed over replicas and each replica
    receives its own slice, so a loss built on gathered tensors back-propagates exactly as the
    single-device loss on the concatenated batch. Identity on one replica.
    """
    ctx = _replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return value
    # Under MultiWorkerMirroredStrategy inside a tf.function, an int32 argument of the replica
    # function has no device of its own and the collective finds no destination; a local copy
    # places it on the replica's device.
    return ctx.all_gather(tf.identity(value), axis=axis)


def replica_offset(local_batch_size: tf.Tensor | int) -> tf.Tensor:
    """Position of this replica's first example in the gathered global batch.

    Computed from the gathered local batch sizes, so it is right even when replicas hold
    batches of different sizes. 0 on one replica.
    """
    size = tf.reshape(tf.cast(local_batch_size, tf.int32), [1])
    sizes = all_gather(size)
    return tf.reduce_sum(sizes[: replica_id()])


def is_first_replica() -> bool | tf.Tensor:
    """Whether this is replica 0 of the whole cluster: True on exactly one replica.

    Under MultiWorkerMirroredStrategy the replica ids run over all workers (worker w's local
    replica r is w x replicas-per-worker + r), so replica 0 is on the first worker. A Python
    bool when the id is known while tracing (no strategy, OneDevice, Mirrored, MultiWorker
    Mirrored), so work that only replica 0 does is not even built on the others; a bool
    tensor when the id is only known at run time.
    """
    rid = replica_id()
    static = tf.get_static_value(rid)
    if static is not None:
        return int(static) == 0
    return tf.equal(rid, 0)


def from_first_replica(value: tf.Tensor) -> tf.Tensor:
    """Replica 0's `value` on every replica (a broadcast), bit for bit, for any dtype.

    An all_gather of `value` with a new leading axis, of which every replica keeps row 0: exact
    for integers and floats alike (no arithmetic), on one machine or a cluster. Every replica
    must call it, with a `value` of the same shape. Identity on one replica.
    """
    if not is_distributed():
        return value
    return all_gather(tf.expand_dims(value, 0))[0]
