"""Mixed precision: scoped policies, what stays float32, and the loss-scaled optimizer step."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from losses import loss_scale
from models import build_model, precision
from models.checkpoints import open_checkpoints
from models.layers import batch_norm


def test_a_scoped_policy_builds_mixed_layers_and_leaves_other_models_float32():
    net = build_model("nin_mnist", precision="bf16", head="nat", feature_dim=8)
    assert keras.config.dtype_policy().name == "float32"
    assert net.get_layer("conv2_1").compute_dtype == "bfloat16"
    assert {v.dtype for v in net.variables if "seed_generator" not in v.path} == {"float32"}
    for name in ("embedding_fc", "embedding"):
        assert net.get_layer(name).compute_dtype == "float32"
    out = net(tf.zeros([2, 28, 28, 1]), training=False)
    assert out["sc"].dtype == tf.bfloat16 and out["embedding"].dtype == tf.float32
    plain = build_model("nin_mnist", head="softmax")
    assert {layer.compute_dtype for layer in plain.layers} == {"float32"}
    with precision.policy_scope("fp16"):
        assert build_model("alexnet", input_shape=(63, 63, 3), fc_units=8).get_layer(
            "conv1").compute_dtype == "float16"
        assert build_model("nin_mnist", precision="none").get_layer(
            "conv1_1").compute_dtype == "float32"
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        precision.policy_name("fp8")


def test_batch_norm_statistics_are_float32_under_float16():
    # 1000 + {0, 1}: in float16 the squares (about 1e6) overflow and the sum of 64 values
    # (about 64000) is at the edge of its range; in float32 the moments are exact.
    with precision.policy_scope("fp16"):
        bn = batch_norm("bn")
    x = tf.cast(1000.0 + np.tile([0.0, 1.0], 32).reshape(64, 1), tf.float16)
    y = bn(x, training=True)
    assert y.dtype == tf.float16 and bn.moving_mean.dtype == "float32"
    np.testing.assert_allclose(bn.moving_mean.numpy(), [0.1 * 1000.5], rtol=1e-7)
    np.testing.assert_allclose(bn.moving_variance.numpy(), [0.9 + 0.1 * 0.25], rtol=1e-6)
    np.testing.assert_allclose(tf.cast(y, tf.float32).numpy()[:2, 0], [-1.0, 1.0], atol=1e-3)


def test_the_loss_scaled_step_applies_true_gradients_and_counts_a_skipped_step():
    w = keras.Variable([1.0, 2.0])
    optimizer = loss_scale.loss_scaled(keras.optimizers.SGD(0.5), "fp16")
    optimizer.build([w])
    assert loss_scale.loss_scaled(keras.optimizers.SGD(0.5), "bf16").__class__ is \
        keras.optimizers.SGD
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(3.0 * w)
        target = loss_scale.scale_loss(optimizer, loss)
    assert float(target) == 9.0 * 2**15
    grads = loss_scale.unscaled_gradients(optimizer, tape, target, [w])
    np.testing.assert_array_equal(grads[0].numpy(), [3.0, 3.0])
    loss_scale.apply_gradients(optimizer, grads, [w])
    np.testing.assert_array_equal(w.numpy(), [-0.5, 0.5])
    assert int(optimizer.iterations.numpy()) == 1
    # float16 overflowed: no update, the scale halves, and the step still counts.
    loss_scale.apply_gradients(optimizer, [tf.constant([np.inf, 1.0])], [w])
    np.testing.assert_array_equal(w.numpy(), [-0.5, 0.5])
    assert int(optimizer.iterations.numpy()) == 2
    assert float(optimizer.dynamic_scale.numpy()) == 2**14


def _objects(prec: str):
    w = tf.Variable([1.0])
    optimizer = loss_scale.loss_scaled(keras.optimizers.SGD(0.1, momentum=0.9), prec)
    optimizer.build([w])
    return {"w": w, **loss_scale.checkpoint_objects(optimizer)}, optimizer


def test_the_loss_scale_is_checkpointed_and_optional_across_precisions(tmp_path):
    objects, optimizer = _objects("fp16")
    optimizer.dynamic_scale.assign(4.0)
    optimizer.step_counter.assign(7)
    _, manager, _ = open_checkpoints(str(tmp_path / "fp16"), objects, keep=1)
    manager.save()
    objects, optimizer = _objects("fp16")
    *_, latest = open_checkpoints(str(tmp_path / "fp16"), objects, keep=1,
                                  optional=[loss_scale.LOSS_SCALE_KEY])
    assert latest and float(optimizer.dynamic_scale.numpy()) == 4.0
    assert int(optimizer.step_counter.numpy()) == 7
    # A float32 run resumed in fp16 starts from the initial scale; without `optional` the
    # missing scale is an error.
    objects, _ = _objects("none")
    _, manager, _ = open_checkpoints(str(tmp_path / "fp32"), objects, keep=1)
    manager.save()
    objects, optimizer = _objects("fp16")
    open_checkpoints(str(tmp_path / "fp32"), objects, keep=1, optional=["loss_scale"])
    assert float(optimizer.dynamic_scale.numpy()) == 2**15
    with pytest.raises(AssertionError):
        open_checkpoints(str(tmp_path / "fp32"), _objects("fp16")[0], keep=1)


def test_the_float32_copy_holds_the_weights_of_a_mixed_network():
    keras.utils.set_random_seed(3)
    mixed = build_model("nin_mnist", precision="bf16", head="nat", feature_dim=8)
    copy = precision.float32_copy(mixed, "nin_mnist", head="nat", feature_dim=8)
    assert {layer.compute_dtype for layer in copy.layers} == {"float32"}
    for a, b in zip(mixed.weights, copy.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
