"""Tests of losses/cross_replica.py's broadcast from replica 0 (the other helpers are exercised
through the losses that use them)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from losses import cross_replica
from tests.helpers import two_replica_strategy

# Per replica: int32 values a float path would round (2**31 - 1 is not a float32), and float32
# values whose bits an arithmetic broadcast would change (-0.0 + 0.0 = +0.0, a NaN payload).
INTS = (np.array([2**31 - 1, -(2**31), 16777217], np.int32), np.array([1, 2, 3], np.int32))
FLOATS = (np.array([-0.0, np.nan, 1e-45], np.float32), np.array([0.0, 1.0, -1.0], np.float32))
FLOATS[0].view(np.uint32)[1] = 0x7FC00123  # a NaN with a payload


def test_from_first_replica_gives_replica_zeros_bits_everywhere():
    strategy = two_replica_strategy()

    def replica():
        rid = tf.distribute.get_replica_context().replica_id_in_sync_group
        ints = tf.where(tf.equal(rid, 0), tf.constant(INTS[0]), tf.constant(INTS[1]))
        floats = tf.where(tf.equal(rid, 0), tf.constant(FLOATS[0]), tf.constant(FLOATS[1]))
        scalar = tf.cast(rid, tf.int64) + 40
        first = cross_replica.is_first_replica()
        return (cross_replica.from_first_replica(ints), cross_replica.from_first_replica(floats),
                cross_replica.from_first_replica(scalar), tf.constant(first))

    for run in (tf.function(lambda: strategy.run(replica)), lambda: strategy.run(replica)):
        ints, floats, scalar, first = (strategy.experimental_local_results(x) for x in run())
        for r in range(2):
            np.testing.assert_array_equal(ints[r].numpy(), INTS[0])
            assert floats[r].numpy().tobytes() == FLOATS[0].tobytes()
            assert scalar[r].numpy() == 40
        assert [bool(f) for f in first] == [True, False]


def test_outside_a_strategy_it_is_the_identity_and_the_first_replica():
    value = tf.constant(FLOATS[0])
    assert cross_replica.from_first_replica(value) is value
    assert cross_replica.is_first_replica() is True
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    result = one.run(lambda: (cross_replica.from_first_replica(value),
                              tf.constant(cross_replica.is_first_replica())))
    assert result[0].numpy().tobytes() == FLOATS[0].tobytes()
    assert bool(result[1])
