"""The XLA-compiled network step: the same decisions as the plain step, and a one-line
fallback where XLA cannot be used."""

import keras
import numpy as np
import tensorflow as tf

from models import build_model
from tests.helpers import is_permutation, two_replica_strategy
from train.compiled import network_forward
from train.config import TrainConfig
from train.trainer import Trainer


def test_the_compiled_step_takes_the_same_decisions_as_the_plain_step(tmp_path):
    """One NAT step with re-assignment from the same weights and batch: the same permutation,
    the loss to 1e-5 and every variable's update to 1e-3 (relative norms; XLA fuses and
    orders reductions differently)."""
    runs = {}
    for jit in (False, True):
        # Pad-and-crop: on the default resized crops (smooth upsampled digits, near-ties in
        # the max-pools) early layers' updates differ by up to 0.7%, against 0.07% here.
        config = TrainConfig(model_dir=str(tmp_path / f"jit{jit}"), batch_size=128, nat_dim=16,
                             jit_compile=jit, crop="pad")
        trainer = Trainer(config, tf.distribute.get_strategy(), log=lambda _: None)
        assert trainer.compiled == jit
        before = [v.numpy() for v in trainer.model.trainable_variables]
        result = trainer.run_steps(trainer.make_iterator(0), 1, reassign=True)
        updates = [v.numpy() - w for v, w in zip(trainer.model.trainable_variables, before,
                                                 strict=True)]
        runs[jit] = (result, trainer.nat.assignment.numpy(), updates)
    (plain, plain_assignment, plain_updates), (jit, jit_assignment, jit_updates) = (
        runs[False], runs[True])
    assert plain.stats["nat/reassigned_fraction"] > 0.5  # the permutation moved targets
    np.testing.assert_array_equal(jit_assignment, plain_assignment)
    assert is_permutation(jit_assignment)
    np.testing.assert_allclose(jit.loss, plain.loss, rtol=1e-5)
    for a, b in zip(jit_updates, plain_updates, strict=True):
        assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b)


def _model_with(op) -> keras.Model:
    images = keras.Input((4, 4, 1))
    x = keras.layers.Lambda(op, output_shape=(4, 4, 1))(images)
    return keras.Model(images, {"out": keras.layers.Conv2D(2, 3)(x)})


def test_where_xla_cannot_be_used_one_line_says_why_and_the_step_runs_uncompiled():
    lines = []
    # An op without an XLA kernel: a Python callback.
    net = _model_with(lambda t: tf.ensure_shape(
        tf.numpy_function(lambda a: 2 * a, [t], tf.float32, stateful=False), [None, 4, 4, 1]))
    forward, compiled = network_forward(net, tf.distribute.get_strategy(), (4, 4, 1), True,
                                        lines.append)
    assert not compiled
    assert lines[-1] == ("--jit_compile: XLA cannot compile the forward pass (no XLA_CPU_JIT "
                         "kernel for the op PyFuncStateless); the network runs uncompiled")
    assert forward(tf.ones([2, 4, 4, 1]))["out"].shape == (2, 2, 2, 2)
    # Synchronized batch norm all-reduces through merge_call under MirroredStrategy.
    for strategy, reason in ((two_replica_strategy(), "not used with 2 replicas"),
                             (tf.distribute.MirroredStrategy(["/cpu:0"]), "`merge_call`")):
        with strategy.scope():
            net = build_model("nin_mnist", head="nat", feature_dim=4)
        _, compiled = network_forward(net, strategy, (28, 28, 1), True, lines.append)
        assert not compiled and reason in lines[-1] and "\n" not in lines[-1]
    _, compiled = network_forward(net, tf.distribute.get_strategy(), (28, 28, 1), False,
                                  lines.append)
    assert not compiled and len(lines) == 3
