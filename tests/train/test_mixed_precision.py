"""NAT and SC under mixed precision: float32 math, losses close to float32, and bf16 / fp16
runs that learn, keep the assignment a permutation and resume exactly."""

import dataclasses
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from data import digits
from data.images import resize_to_input
from data.pretrain import open_source
from losses.nat import NoiseAsTargets, nat_loss, sphere_targets
from losses.spatial_contrasting import multi_endpoint_loss, spatial_contrasting_loss
from models import build_model
from tests.helpers import ROOT, checkpoint_tensors, is_permutation, scalars, test_env
from train.config import TrainConfig
from train.trainer import Trainer

# Unit roundoff of the compute dtypes (half the gap between 1 and the next number).
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}


def test_nat_and_sc_compute_in_float32_whatever_the_feature_dtype():
    z = tf.math.l2_normalize(tf.random.stateless_normal([16, 8], seed=[1, 2]), axis=1)
    low = tf.cast(z, tf.bfloat16)
    c = sphere_targets(tf.range(16), 8, seed=0)
    loss = nat_loss(low, c)
    assert loss.dtype == tf.float32
    np.testing.assert_array_equal(loss.numpy(), nat_loss(tf.cast(low, tf.float32), c).numpy())
    results = []
    for features in (low, tf.cast(low, tf.float32)):
        module = NoiseAsTargets(64, 8, seed=0)
        per_example, _ = module(tf.range(16), features, reassign=True)
        results.append((per_example.numpy(), module.assignment.numpy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    a, b = (tf.cast(tf.random.stateless_normal([8, 12], seed=[s, 0]), tf.float16) for s in (3, 4))
    np.testing.assert_array_equal(
        spatial_contrasting_loss(a, b).numpy(),
        spatial_contrasting_loss(tf.cast(a, tf.float32), tf.cast(b, tf.float32)).numpy())


@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_losses_under_a_mixed_policy_match_float32_on_the_same_weights(prec):
    """Tolerance: per example 32 u relative and the batch mean 2 u, u the compute dtype's unit
    roundoff (bf16: 3.1e-2 per example, 0.8% for the mean; fp16: 1.6e-2 and 0.1%)."""
    images = resize_to_input(digits.split_arrays("train")[0][:64], (28, 28, 1))
    keras.utils.set_random_seed(0)
    reference = build_model("nin_mnist", head="nat", feature_dim=32)
    mixed = build_model("nin_mnist", precision=prec, head="nat", feature_dim=32)
    mixed.set_weights(reference.get_weights())
    targets = sphere_targets(tf.range(64), 32, seed=0)
    losses = []
    for net in (reference, mixed):
        out = net(images, training=True)
        losses.append((nat_loss(out["embedding"], targets).numpy(),
                       multi_endpoint_loss(out, {"sc": 1.0}, (5, 5), [1, 2]).total.numpy()))
    u = UNIT_ROUNDOFF[prec]
    for expected, got in zip(losses[0], losses[1], strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=32 * u)
        assert abs(got.mean() - expected.mean()) <= 2 * u * abs(expected.mean())


# The first 256 digits of the train split: 4 steps of 64 per epoch.
SUBSET = 256


def _digits_subset():
    full = open_source("digits", (28, 28, 1))
    return dataclasses.replace(full, num_examples=SUBSET,
                               elements=lambda: full.elements().take(SUBSET))


def _config(path, prec: str, method: str, jit: bool) -> TrainConfig:
    # NAT with the released code's plain SGD, SC with momentum: settings under which both
    # losses fall within two epochs of four steps.
    optimizer = dict(lr=0.1, momentum=0.0) if method == "nat" else dict(lr=0.05, momentum=0.9)
    return TrainConfig(model_dir=str(path), method=method, mixed_precision=prec,
                       jit_compile=jit, batch_size=64, epochs=2, nat_dim=8,
                       nat_reassign_every=1, sc_patch="5x5", steps_per_loop=2,
                       checkpoint_every=2, keep_checkpoints=10, **optimizer)


# Resumes the run of `_config(model_dir, prec, method, jit)` on the digit subset, as a new
# process of the test session's devices (tests/conftest.py splits the CPU in two).
RESUME = """
import sys
import tests.conftest
import tensorflow as tf
from tests.train.test_mixed_precision import _config, _digits_subset
from train.trainer import Trainer
model_dir, prec, method, jit = sys.argv[1:]
trainer = Trainer(_config(model_dir, prec, method, jit == "True"),
                  tf.distribute.get_strategy(), source=_digits_subset(), log=print)
trainer.train()
trainer.close()
"""


def _stopped_at(model_dir: str, copy: str, step: int) -> None:
    """`copy`: the run folder as a run killed right after its checkpoint of `step` leaves it."""
    kept = [f"ckpt-{s}" for s in range(2, step + 1, 2)]
    shutil.copytree(model_dir, copy, ignore=lambda folder, names: [
        n for n in names if n == ".lock" or n == "checkpoint" or (
            n.startswith("ckpt-") and n.split(".")[0] not in kept)])
    with open(os.path.join(copy, "checkpoint"), "w") as f:
        f.write(f'model_checkpoint_path: "{kept[-1]}"\n'
                + "".join(f'all_model_checkpoint_paths: "{k}"\n' for k in kept))


@pytest.mark.slow
@pytest.mark.parametrize("prec, method, jit", [("bf16", "nat", True), ("bf16", "sc", True),
                                               ("fp16", "nat", False), ("fp16", "sc", False)])
def test_a_mixed_precision_run_learns_and_resumes_bitwise_in_a_new_process(tmp_path, prec,
                                                                          method, jit):
    source = _digits_subset()
    config = _config(tmp_path / "run", prec, method, jit)
    assert config.to_json()["mixed_precision"] == prec
    trainer = Trainer(config, tf.distribute.get_strategy(), source=source, log=lambda _: None)
    assert trainer.compiled == jit
    trainer.train()
    losses = scalars(config.model_dir)["loss"]  # one value per loop of 2 steps
    assert len(losses) == 4 and np.all(np.isfinite(losses))
    assert np.mean(losses[2:]) < np.mean(losses[:2])  # epoch 2 below epoch 1
    if method == "nat":
        assert is_permutation(trainer.nat.assignment.numpy())

    # Killed after its checkpoint of step 6 (mid-epoch 2), resumed by a new process: the
    # network, the optimizer (with the fp16 loss scale and its growth counter), the NAT
    # assignment and the plateau state of step 8 are bitwise those of the uninterrupted run.
    copy = str(tmp_path / "resumed")
    _stopped_at(config.model_dir, copy, 6)
    done = subprocess.run([sys.executable, "-c", RESUME, copy, prec, method, str(jit)],
                          cwd=ROOT, env=test_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed {copy}/ckpt-6 at step 6" in done.stdout
    want = checkpoint_tensors(os.path.join(config.model_dir, "ckpt-8"))
    got = checkpoint_tensors(os.path.join(copy, "ckpt-8"))
    assert sorted(got) == sorted(want)
    if prec == "fp16":
        assert any(key.startswith("loss_scale") for key in want), sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
