"""Cost of a Spatial Contrasting pretraining step against a supervised step.

Protocol: `nin_cifar10` on one batch of random 32x32x3 images (batch 128 by default), SGD
(lr 0.1, momentum 0.9, the paper's initial rate). Each step is one `tf.function`: forward in
training mode, loss, backward, optimizer apply.

- supervised: softmax cross-entropy on the "logits" endpoint (head "softmax").
- SC: two windows per image from the "sc" endpoint ([N, 8, 8, 192]), each of 0.3 of the
  map's area (4x4 cells, each averaged over its cells to one 192-value vector, the zoo's
  default `pool="avg"`; SC Sec. 5 uses ~30% on CIFAR-10), the
  symmetric distance-ratio loss, a fresh sampling seed every step, on the model the SC
  pretraining uses (head "none": the network stops at "sc"; the layers up to "sc" are those
  of the supervised model).
- SC loss only: sampling + loss + gradient w.r.t. a fixed "sc" map, i.e. what SC adds on top
  of the network.

Steps are timed in interleaved rounds (so background load hits every variant alike); the
table gives the median time per step over rounds and its ratio to the supervised step.

One step of either network takes seconds on a small CPU, hence the few steps by default.

    python -m benchmarks.sc_step [--batch_size=128 --steps=2 --rounds=3 --warmup=1]
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from runtime.cli import quiet_tensorflow

quiet_tensorflow()  # the zoo's quiet start: no TensorFlow start-up lines

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from losses.spatial_contrasting import (
    patch_hw,
    sample_patch_pairs,
    spatial_contrasting_loss,
)
from models import build_model

flags.DEFINE_integer("batch_size", 128, "Images per step.", lower_bound=2)
flags.DEFINE_integer("steps", 2, "Timed steps per round and variant.", lower_bound=1)
flags.DEFINE_integer("rounds", 3, "Timing rounds (the median is reported).", lower_bound=1)
flags.DEFINE_integer("warmup", 1, "Untimed steps per variant after tracing.", lower_bound=0)
flags.DEFINE_float("patch_area", 0.3, "SC window size as a fraction of the map's area.",
                   lower_bound=1e-6, upper_bound=1.0)

MODEL = "nin_cifar10"


@dataclass(frozen=True)
class Config:
    batch_size: int
    steps: int
    rounds: int
    warmup: int
    patch_area: float


def _optimizer(model: keras.Model) -> keras.optimizers.Optimizer:
    optimizer = keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)
    optimizer.build(model.trainable_variables)
    return optimizer


def _apply(tape: tf.GradientTape, loss: tf.Tensor, model: keras.Model,
           optimizer: keras.optimizers.Optimizer) -> None:
    variables = model.trainable_variables
    optimizer.apply(tape.gradient(loss, variables), variables)


def supervised_step_fn(model: keras.Model):
    optimizer = _optimizer(model)

    @tf.function
    def step(images, labels, seed):
        del seed
        with tf.GradientTape() as tape:
            logits = model(images, training=True)["logits"]
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
        _apply(tape, loss, model, optimizer)
        return loss

    return step


def sc_step_fn(model: keras.Model, patch_area: float):
    optimizer = _optimizer(model)

    @tf.function
    def step(images, labels, seed):
        del labels
        with tf.GradientTape() as tape:
            feature_map = model(images, training=True)["sc"]
            anchors, contrasts = sample_patch_pairs(feature_map, patch_area, seed)
            loss = tf.reduce_mean(spatial_contrasting_loss(anchors, contrasts))
        _apply(tape, loss, model, optimizer)
        return loss

    return step


def sc_loss_only_fn(feature_map: tf.Tensor, patch_area: float):
    feature_map = tf.Variable(feature_map)

    @tf.function
    def step(images, labels, seed):
        del images, labels
        with tf.GradientTape() as tape:
            anchors, contrasts = sample_patch_pairs(feature_map, patch_area, seed)
            loss = tf.reduce_mean(spatial_contrasting_loss(anchors, contrasts))
        feature_map.assign_sub(0.1 * tape.gradient(loss, feature_map))
        return loss

    return step


def run(config: Config) -> str:
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 1, (config.batch_size, 32, 32, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, 10, config.batch_size), tf.int32)

    softmax_model = build_model(MODEL)
    sc_model = build_model(MODEL, head="none")
    sc_map = softmax_model(images, training=False)["sc"]
    h, w = patch_hw(config.patch_area, sc_map.shape[1:3])
    variants = {
        'supervised cross-entropy on "logits"': supervised_step_fn(softmax_model),
        'SC on "sc", head "none" (pretraining)': sc_step_fn(sc_model, config.patch_area),
        "SC loss only (sample + loss + grad)": sc_loss_only_fn(sc_map, config.patch_area),
    }

    counter = 0

    def call(step):
        nonlocal counter
        counter += 1
        return step(images, labels, tf.constant([0, counter], tf.int64))

    for step in variants.values():
        for _ in range(config.warmup + 1):  # the first call traces
            loss = call(step)
        if not np.isfinite(loss.numpy()):
            raise RuntimeError("non-finite loss in warm-up")

    times = {name: [] for name in variants}
    for _ in range(config.rounds):
        for name, step in variants.items():
            start = time.perf_counter()
            for _ in range(config.steps):
                loss = call(step)
            loss.numpy()
            times[name].append((time.perf_counter() - start) / config.steps)

    base = float(np.median(times['supervised cross-entropy on "logits"']))
    rows = [f"{MODEL}, batch {config.batch_size}, SC map {list(sc_map.shape[1:])}, "
            f"windows {h}x{w} (area {config.patch_area}) averaged to {sc_map.shape[3]} values, "
            f"symmetric L2 loss; median of {config.rounds} rounds x {config.steps} steps",
            "",
            f"| {'step':<40} | {'ms / step':>10} | {'ratio to supervised':>20} |",
            f"|{'-' * 42}|{'-' * 12}|{'-' * 22}|"]
    for name, samples in times.items():
        median = float(np.median(samples))
        rows.append(f"| {name:<40} | {1e3 * median:>10.1f} | {median / base:>20.3f} |")
    sc_ratio = float(np.median(times['SC on "sc", head "none" (pretraining)'])) / base
    rows += ["", f"SC pretraining step / supervised step = {sc_ratio:.3f} (goal <= 1.10)"]
    return "\n".join(rows)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    config = Config(f.batch_size, f.steps, f.rounds, f.warmup, f.patch_area)
    print(run(config))


if __name__ == "__main__":
    app.run(main)
