"""The order in which a pretraining epoch visits its images (data.pretrain), a function of
(seed, epoch) alone.

Sources fetched by index (digits, folders) visit a uniform permutation of ALL their indices
[0, n) each epoch (`permutation`): the argsort of n int64 keys drawn statelessly from
(seed, epoch). The listing's order does not matter: a folder sorted by class (ImageNet's
`train/<wnid>/`) mixes as well as a shuffled one, and any two images can meet in a batch. It
holds n int64 keys and indices, never n images; benchmarks/shuffle_mixing.py measures it.

The tfds sources are read from their record files in order and cannot be fetched by index.
tfds writes those files in an order shuffled by a hash of each example's key when it prepares
them, so they are not sorted by class; they keep a block shuffle (`block_shuffled`): blocks of
SHUFFLE_BUFFER consecutive elements are permuted by keys drawn from (seed, epoch, block), a
uniform permutation when the stream fits in one block; longer streams also pass through a
shuffle buffer of that size. A batch then draws from a window of the stream: on a listing of
ImageNet's size sorted by class, a batch of 256 holds 51 classes on average (14 at least)
where a uniform draw holds 226 (benchmarks/shuffle_mixing.py).
"""

from __future__ import annotations

import tensorflow as tf

SHUFFLE_BUFFER = 16384


def permutation(num_examples: int, seed: int, epoch: tf.Tensor | int) -> tf.Tensor:
    """int64 [num_examples]: the indices in the order of `epoch`, a uniform permutation of
    [0, num_examples): the argsort of int64 keys drawn statelessly from the seed pair
    (seed, -1 - epoch), which the augmentation's (seed, epoch * n + index >= 0) never takes.
    Equal keys (chance about n^2 / 2^65) keep their index order."""
    seed_pair = tf.stack([tf.constant(seed, tf.int64), -1 - tf.cast(epoch, tf.int64)])
    keys = tf.random.stateless_uniform([num_examples], seed_pair, minval=None, maxval=None,
                                       dtype=tf.int64)
    return tf.cast(tf.argsort(keys, stable=True), tf.int64)


def block_shuffled(elements: tf.data.Dataset, seed: int, epoch: tf.Tensor | int, size: int
                   ) -> tf.data.Dataset:
    """The (index, raw) elements of a stream of `size` elements in the block-shuffled order of
    (seed, epoch) (module docstring)."""
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
