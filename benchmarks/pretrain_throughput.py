"""Pretraining throughput: NAT and SC steps against a supervised step, and the input pipeline.

    python -m benchmarks.pretrain_throughput [--model=nin_mnist --dataset=digits --batch_size=128]

Every row runs the same pipeline (data/pretrain.py: shuffle, augment, batch, prefetch) through
`distribute_datasets_from_function` and the same kind of loop (`strategy.run` inside one
tf.function over `steps_per_loop` steps):

    input pipeline   next(iterator) only
    supervised       the model with its softmax head, sparse cross-entropy on the labels of the
                     batch's images (digits: the real labels; otherwise fixed random labels);
                     and the same with the NAT network's trunk and head shape (global average
                     of `sc`, one Dense layer, 10 classes instead of d), the like-for-like
                     comparison of NAT Table 1
    NAT              the model with the NAT head; re-assignment on (the costlier epochs) and off
    SC               the model up to `sc`, the SC loss there

Goals (issue): NAT >= 0.95 x supervised with the same trunk and head (NAT Sec. 1: "barely
less efficient to train"); input pipeline >= 3 x the training step rate. Times are medians
over `--rounds` rounds, with the rows interleaved so that machine load affects them alike.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from models import build_model
from train.config import TrainConfig
from train.trainer import Trainer

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "nin_mnist", "Model.")
flags.DEFINE_string("dataset", "digits", "Pretraining dataset.")
flags.DEFINE_integer("batch_size", 128, "Global batch.")
flags.DEFINE_integer("steps", 8, "Timed steps per round and row.")
flags.DEFINE_integer("rounds", 3, "Rounds (median reported).")
flags.DEFINE_integer("nat_dim", 64, "NAT dimension.")
flags.DEFINE_string("sc_patch", "6x6", "SC window (HxW cells).")


def _trainer(method: str, model_dir: str) -> Trainer:
    config = TrainConfig(model_dir=model_dir, method=method, model=FLAGS.model,
                         dataset=FLAGS.dataset, batch_size=FLAGS.batch_size, epochs=1000,
                         nat_dim=FLAGS.nat_dim, sc_patch=FLAGS.sc_patch,
                         steps_per_loop=FLAGS.steps, crop="pad", crop_pad=2)
    return Trainer(config, tf.distribute.get_strategy(), log=lambda _: None)


class Supervised:
    """The supervised step on the same stream: softmax head, labels looked up by index."""

    def __init__(self, reference: Trainer, nat_shaped: bool):
        self.strategy = reference.strategy
        self.batch = FLAGS.batch_size
        with self.strategy.scope():
            if nat_shaped:
                # The NAT network with a 10-way softmax in place of the d-dim embedding: the
                # same trunk and the same kind of head, as in NAT Table 1 (softmax vs square).
                trunk = build_model(FLAGS.model, head="none", input_shape=reference.input_shape)
                pooled = keras.layers.GlobalAveragePooling2D()(trunk.output["sc"])
                logits = keras.layers.Dense(10, dtype="float32")(pooled)
                self.model = keras.Model(trunk.input, {"logits": logits})
            else:
                self.model = build_model(FLAGS.model, head="softmax",
                                         input_shape=reference.input_shape)
            self.optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
            self.optimizer.build(self.model.trainable_variables)
        if FLAGS.dataset == "digits":
            from data import digits

            labels = digits.split_arrays("train")[1]
        else:
            labels = np.random.default_rng(0).integers(0, 10, reference.source.num_examples)
        self.labels = tf.constant(labels.astype(np.int32))
        self.loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="none")

        def replica_step(batch):
            indices, images = batch
            with tf.GradientTape() as tape:
                logits = self.model(images, training=True)["logits"]
                per_example = self.loss(tf.gather(self.labels, indices), logits)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.batch)
            grads = tape.gradient(loss, self.model.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables,
                                               strict=True))
            return loss

        @tf.function
        def loop(iterator, steps):
            total = tf.constant(0.0)
            for _ in tf.range(steps):
                loss = self.strategy.run(replica_step, args=(next(iterator),))
                total += self.strategy.reduce("SUM", loss, axis=None)
            return total

        self.loop = loop

    def run_steps(self, iterator, steps: int) -> None:
        self.loop(iterator, tf.constant(steps)).numpy()


def _pipeline(iterator, steps: int) -> None:
    for _ in range(steps):
        next(iterator)


def main(argv):
    del argv
    tmp = tempfile.mkdtemp()
    nat, sc = _trainer("nat", f"{tmp}/nat"), _trainer("sc", f"{tmp}/sc")
    supervised = Supervised(nat, nat_shaped=False)
    same_head = Supervised(nat, nat_shaped=True)
    rows = {
        "input pipeline": (nat.make_iterator(0), lambda it, n: _pipeline(it, n)),
        "supervised (softmax head)": (nat.make_iterator(0), supervised.run_steps),
        "supervised (NAT-shaped head)": (nat.make_iterator(0), same_head.run_steps),
        "NAT, re-assignment on": (nat.make_iterator(0), lambda it, n: nat.run_steps(it, n, True)),
        "NAT, re-assignment off": (nat.make_iterator(0),
                                   lambda it, n: nat.run_steps(it, n, False)),
        "SC": (sc.make_iterator(0), lambda it, n: sc.run_steps(it, n, False)),
    }
    for iterator, step in rows.values():  # trace and warm up
        step(iterator, FLAGS.steps)
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(FLAGS.rounds):
        for name, (iterator, step) in rows.items():
            start = time.perf_counter()
            step(iterator, FLAGS.steps)
            times[name].append(time.perf_counter() - start)
    rate = {name: FLAGS.steps * FLAGS.batch_size / statistics.median(t)
            for name, t in times.items()}
    base = rate["supervised (softmax head)"]
    print(f"{FLAGS.model} on {FLAGS.dataset}, batch {FLAGS.batch_size}, "
          f"{tf.distribute.get_strategy().num_replicas_in_sync} replica(s); median of "
          f"{FLAGS.rounds} rounds x {FLAGS.steps} steps\n")
    print(f"| {'path':<28} | {'images/s':>9} | {'vs supervised':>13} |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 15}|")
    for name, value in rate.items():
        print(f"| {name:<28} | {value:>9.0f} | {value / base:>13.2f} |")
    slowest = min(v for k, v in rate.items() if k != "input pipeline")
    same = rate["supervised (NAT-shaped head)"]
    print(f"\nNAT (re-assignment on) / supervised with the same trunk and head shape = "
          f"{rate['NAT, re-assignment on'] / same:.2f} (goal >= 0.95); input pipeline / "
          f"slowest step = {rate['input pipeline'] / slowest:.1f}x (goal >= 3)")


if __name__ == "__main__":
    app.run(main)
