"""The XLA-compiled network step: the same decisions as the plain step (within float32 rounding
of a float64 reference), and a one-line fallback where XLA cannot be used."""

import keras
import numpy as np
import tensorflow as tf

from models import build_model
from tests.helpers import is_permutation, two_replica_strategy
from train.compiled import network_forward
from train.config import TrainConfig
from train.trainer import Trainer

# Unit roundoff of float32.
U = 2.0**-24


def _gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): a float32 sum of n terms, in any order and with any
    grouping (fused or not), is within gamma_n * sum |terms| of the exact sum."""
    return n * U / (1 - n * U)


def _report(rows) -> None:
    """Print the worst |float32 - float64| / bound of each variable (for the record)."""
    print("\n".join(f"{path}: {ratio:.2e}" for path, ratio in rows))


def _float64_step(weights, images, targets, weight_decay: float):
    """The step's loss, its gradient for every trainable variable of nin_mnist with `weights`
    (float32, taken as exact) and, per variable, (n, A): the length n of the sum that makes
    each of its gradient's entries and the sum A of the absolute values of that sum's terms,
    all in float64 (the trunk rebuilt under a float64 policy, the float32 head written out)."""
    keras.config.set_dtype_policy("float64")
    try:
        ref = build_model("nin_mnist", head="nat", feature_dim=targets.shape[1])
    finally:
        keras.config.set_dtype_policy("float32")
    ref.set_weights(weights)
    layers = [layer for layer in ref.layers if layer.trainable_weights and
              layer.name != "embedding_fc"]
    probe = keras.Model(ref.input, [ref.output["sc"],
                                    *[(layer.input, layer.output) for layer in layers]])
    w, b = (tf.Variable(v.numpy().astype(np.float64)) for v in
            ref.get_layer("embedding_fc").trainable_weights)
    with tf.GradientTape(persistent=True) as tape:
        trunk, *inout = probe(tf.cast(images, tf.float64), training=True)
        pooled = tf.reduce_mean(trunk, axis=[1, 2])
        z = pooled @ w + b
        loss = tf.reduce_mean(tf.reduce_sum(tf.square(tf.math.l2_normalize(z, 1) - targets), 1))
        kernels = [v for v in ref.trainable_variables if v.path.endswith("kernel") and
                   not v.path.startswith("embedding_fc")]
        total = loss + 0.5 * weight_decay * (sum(tf.reduce_sum(tf.square(k)) for k in kernels)
                                             + tf.reduce_sum(tf.square(w)))
    variables = [v if not v.path.startswith("embedding_fc") else (w if v.path.endswith(
        "kernel") else b) for v in ref.trainable_variables]
    grads = tape.gradient(total, variables)
    deltas = tape.gradient(total, [out for _, out in inout] + [z])
    sums, chain = {}, len(z) + 2 * w.shape[0] + 3 * w.shape[1]  # head: mean, dense, norm
    for layer, (x, y), d in zip(layers, inout, deltas[:-1], strict=True):
        n, d = int(np.prod(d.shape[:-1])), tf.abs(d)
        chain += 4 * n  # BN's moments and their gradients; a kernel's own sum
        if isinstance(layer, keras.layers.Conv2D):
            with tf.GradientTape() as t:
                t.watch(layer.kernel.value)
                s = tf.reduce_sum(layer.convolution_op(tf.abs(tf.cast(x, tf.float64)),
                                                      layer.kernel.value) * d)
            sums[layer.kernel.path] = (n, t.gradient(s, layer.kernel.value))
            chain += int(np.prod(layer.kernel.shape[:2])) * sum(layer.kernel.shape[2:])
            if layer.use_bias:
                sums[layer.bias.path] = (n, tf.reduce_sum(d, [0, 1, 2]))
        else:  # batch norm: y = gamma x_hat + beta
            x_hat = (y - layer.beta) / layer.gamma
            sums[layer.gamma.path] = (n, tf.reduce_sum(d * tf.abs(x_hat), [0, 1, 2]))
            sums[layer.beta.path] = (n, tf.reduce_sum(d, [0, 1, 2]))
    d = tf.abs(deltas[-1])
    sums["embedding_fc/kernel"] = (len(z), tf.transpose(tf.abs(pooled)) @ d)
    sums["embedding_fc/bias"] = (len(z), tf.reduce_sum(d, 0))
    for v in [*kernels, w]:  # the weight decay adds wd * W: one more term
        path = "embedding_fc/kernel" if v is w else v.path
        n, a = sums[path]
        sums[path] = (n + 1, a + weight_decay * tf.abs(v))
    bounds = [sums[v.path] for v in ref.trainable_variables]
    return (float(total), [g.numpy() for g in grads], [(n, a.numpy()) for n, a in bounds],
            chain)


def test_the_compiled_step_takes_the_same_decisions_as_the_plain_step(tmp_path):
    """One NAT step with re-assignment from the same weights and batch: the same permutation,
    and the loss and every variable's gradient within float32 rounding of a float64 reference.

    What may differ between the two steps is where float32 rounds: XLA fuses kernels and orders
    and groups the reductions differently. Each entry of a gradient is finally a sum of n terms
    (a convolution kernel's: over the batch and the map's positions; a bias's or a BN
    parameter's: over the batch and positions of its channel), so whatever the order, each
    float32 step must be within gamma_n * sum |terms| of the exact sum, and the test computes
    both n and the terms from the step's own tensors in float64. That bounds the rounding of
    the last sum; rounding further up the network reaches it through the terms, whose own
    errors are first-order smaller. Relative norms would not do: the gradient of a BN scale
    whose channel the next BN normalises again is near 0 (only BN's epsilon keeps it from 0),
    a sum of terms that cancel."""
    runs = {}
    for jit in (False, True):
        # Pad-and-crop: on the default resized crops (smooth upsampled digits) near-ties in
        # the max-pools can send a gradient to another cell, which no rounding bound covers.
        config = TrainConfig(model_dir=str(tmp_path / f"jit{jit}"), batch_size=128, nat_dim=16,
                             jit_compile=jit, crop="pad")
        trainer = Trainer(config, tf.distribute.get_strategy(), log=lambda _: None)
        assert trainer.compiled == jit
        indices, images = next(trainer.make_iterator(0))
        weights = trainer.model.get_weights()  # the same seeded init in both
        result = trainer.run_steps(trainer.make_iterator(0), 1, reassign=True)
        # The first SGD step's momentum is -lr * gradient (a product: rounded once).
        gradients = [-m.numpy() / config.lr for m in trainer.optimizer.momentums]
        runs[jit] = (result, trainer.nat.assignment.numpy(), gradients)
    (plain, plain_assignment, _), (jit, jit_assignment, _) = runs[False], runs[True]
    assert plain.stats["nat/reassigned_fraction"] > 0.5  # the permutation moved targets
    np.testing.assert_array_equal(jit_assignment, plain_assignment)
    assert is_permutation(jit_assignment)

    targets = tf.cast(trainer.nat.vectors(tf.gather(plain_assignment, indices)), tf.float64)
    loss, exact, bounds, chain = _float64_step(weights, images, targets, config.weight_decay)
    for result, _, gradients in runs.values():
        # the loss: a mean of 128 x 16 squares, then the decay over every kernel entry
        assert abs(result.loss - loss) <= _gamma(chain) * loss
        rows = []
        for g, e, (n, a), v in zip(gradients, exact, bounds, trainer.model.trainable_variables,
                                   strict=True):
            bound = _gamma(n + chain) * a + 2 * U * np.abs(e)  # (+ momentum's, lr's roundings)
            rows.append((v.path, float(np.max(np.abs(g - e) / bound))))
            assert np.all(np.abs(g - e) <= bound), rows[-1]
        _report(rows)


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
