"""Pretraining throughput: NAT and SC steps against a supervised step, and the input pipeline.

    python -m benchmarks.pretrain_throughput [--model=nin_mnist --dataset=digits --batch_size=128]
    python -m benchmarks.pretrain_throughput --mixed_precision=none,bf16

Every row runs the same pipeline (data/pretrain.py: shuffle, augment, batch, prefetch) through
`distribute_datasets_from_function` and the same kind of loop (`strategy.run` inside one
tf.function over `steps_per_loop` steps):

    input pipeline   next(iterator) only
    supervised       the model with its softmax head, sparse cross-entropy on the labels of the
                     batch's images (digits: the real labels; otherwise fixed random labels);
                     and the same with the NAT network's trunk and head shape (global average
                     of `sc`, one Dense layer, 10 classes instead of d), the like-for-like
                     comparison of NAT Table 1 (benchmarks/steps.py)
    NAT              the model with the NAT head; re-assignment on (the costlier epochs) and off
    SC               the model up to `sc`, the SC loss there

No step has weight decay (its L2 term would cost every row the same).

Each step row is measured for every precision of `--mixed_precision` (models/precision.py;
bf16 and fp16 keep the heads and losses float32), optionally XLA-compiled (`--jit_compile`).
Goals: NAT step time with re-assignment <= 1.05 x the supervised step with the same trunk and
head shape (NAT Sec. 1: "barely less efficient to train"); input pipeline >= 3 x the training
step rate. Times are medians over `--rounds` rounds, with the rows interleaved so that machine
load affects them alike. On a CPU without bfloat16 arithmetic (most x86 CPUs before AMX),
bf16 is emulated and several times slower than float32; the ratio is still meaningful.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from runtime.cli import quiet_tensorflow

quiet_tensorflow()  # the zoo's quiet start: no TensorFlow start-up lines

import numpy as np
import tensorflow as tf
from absl import app, flags

from benchmarks.steps import SupervisedStep
from data import digits
from models import PRECISIONS
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
flags.DEFINE_list("mixed_precision", ["none"], f"Precisions to measure ({', '.join(PRECISIONS)}).")
flags.DEFINE_boolean("jit_compile", False, "Compile the network's forward and backward (XLA).")


def _trainer(method: str, model_dir: str, mixed_precision: str) -> Trainer:
    config = TrainConfig(model_dir=model_dir, method=method, model=FLAGS.model,
                         dataset=FLAGS.dataset, batch_size=FLAGS.batch_size, epochs=1000,
                         nat_dim=FLAGS.nat_dim, sc_patch=FLAGS.sc_patch,
                         steps_per_loop=FLAGS.steps, crop="pad", crop_pad=2,
                         mixed_precision=mixed_precision, jit_compile=FLAGS.jit_compile,
                         weight_decay=0.0)
    return Trainer(config, tf.distribute.get_strategy(), log=lambda _: None)


def _labels(reference: Trainer) -> np.ndarray:
    if FLAGS.dataset == "digits":
        return digits.split_arrays("train")[1]
    return np.random.default_rng(0).integers(0, 10, reference.source.num_examples)


def _pipeline(iterator, steps: int) -> None:
    for _ in range(steps):
        next(iterator)


def _rows(tmp: str, prec: str) -> tuple[Trainer, dict]:
    """(the NAT trainer, {row name: (iterator, step function)}) of one precision."""
    nat, sc = _trainer("nat", f"{tmp}/nat_{prec}", prec), _trainer("sc", f"{tmp}/sc_{prec}", prec)
    supervised, same_head = (
        SupervisedStep(FLAGS.model, nat.input_shape, _labels(nat), FLAGS.batch_size,
                       nat.strategy, nat_shaped=shaped, mixed_precision=prec,
                       jit_compile=FLAGS.jit_compile, log=lambda _: None)
        for shaped in (False, True))
    tag = f" [{prec}]"
    return nat, {
        "supervised (softmax head)" + tag: (nat.make_iterator(0), supervised.run_steps),
        "supervised (NAT-shaped head)" + tag: (nat.make_iterator(0), same_head.run_steps),
        "NAT, re-assignment on" + tag: (nat.make_iterator(0),
                                        lambda it, n: nat.run_steps(it, n, True)),
        "NAT, re-assignment off" + tag: (nat.make_iterator(0),
                                         lambda it, n: nat.run_steps(it, n, False)),
        "SC" + tag: (sc.make_iterator(0), lambda it, n: sc.run_steps(it, n, False)),
    }


def main(argv):
    del argv
    for prec in FLAGS.mixed_precision:
        if prec not in PRECISIONS:
            raise app.UsageError(f"--mixed_precision={prec}: choose from {', '.join(PRECISIONS)}")
    tmp = tempfile.mkdtemp()
    rows = {}
    for prec in FLAGS.mixed_precision:
        nat, more = _rows(tmp, prec)
        rows.update(more)
    rows["input pipeline"] = (nat.make_iterator(0), _pipeline)
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
    print(f"{FLAGS.model} on {FLAGS.dataset}, batch {FLAGS.batch_size}, "
          f"{tf.distribute.get_strategy().num_replicas_in_sync} replica(s), XLA "
          f"{'on' if FLAGS.jit_compile else 'off'}; median of {FLAGS.rounds} rounds x "
          f"{FLAGS.steps} steps\n")
    print(f"| {'path':<35} | {'images/s':>9} | {'vs supervised':>13} |")
    print(f"|{'-' * 37}|{'-' * 11}|{'-' * 15}|")
    for name, value in rate.items():
        tag = name[name.find(" ["):] if " [" in name else f" [{FLAGS.mixed_precision[0]}]"
        base = rate["supervised (softmax head)" + tag]
        print(f"| {name:<35} | {value:>9.0f} | {value / base:>13.2f} |")
    print()
    for prec in FLAGS.mixed_precision:
        tag = f" [{prec}]"
        slowest = min(v for k, v in rate.items() if k.endswith(tag))
        ratio = rate["supervised (NAT-shaped head)" + tag] / rate["NAT, re-assignment on" + tag]
        print(f"{prec}: NAT step (re-assignment on) / supervised step with the same trunk and "
              f"head shape = {ratio:.3f} (goal <= 1.05); input pipeline / slowest step = "
              f"{rate['input pipeline'] / slowest:.1f}x (goal >= 3)")


if __name__ == "__main__":
    app.run(main)
