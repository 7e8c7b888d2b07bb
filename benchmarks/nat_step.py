"""NAT step costs: target generation, the Hungarian step, the state size, a training step.

    python -m benchmarks.nat_step [--steps=6] [--feature_dim=2048]

Prints one table:
  1. `sphere_targets` for 256 x 2048 against one `tf.random.stateless_normal([256, 2048])`
     (both in a tf.function, the seed fed as a tensor so nothing is constant-folded); goal <= 2x.
  2. `optimal_assignment` (scipy through tf.py_function, in a tf.function) on a b x b
     squared-distance cost between unit features and sphere targets, b = 64, 256, 1024.
  3. NAT state bytes per image at n = 1.28M, d = 2048, measured on the module's variables,
     beside what a dense target matrix would take.
  4. A training step of nin_cifar10 (head "nat", SGD, batch 256, forward + NAT loss +
     backward + apply) with re-assignment on and off, timed interleaved; goal: ratio <= 1.05.
     The NAT call alone (same batch size and d, on fixed features) is timed too: its on - off
     difference is the whole cost of re-assignment, and gives the ratio it implies for the step.
Micro-benchmarks report the median over repeats; training steps, which take seconds on a CPU
where other processes add noise, report the best of the timed steps, in wall time and in this
process's CPU time (which other processes disturb less). Milliseconds.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from losses.nat import NoiseAsTargets, optimal_assignment, sphere_targets
from models import build_model

_STEPS = flags.DEFINE_integer("steps", 3, "Timed training steps per setting (re-assign on/off).",
                              lower_bound=1)
_FEATURE_DIM = flags.DEFINE_integer("feature_dim", 2048, "NAT dimension d of the trained model.",
                                    lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 30, "Repeats of the micro-benchmarks (1, 2).",
                                lower_bound=1)


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int
    feature_dim: int
    repeats: int
    batch: int = 256
    num_examples: int = 50_000  # CIFAR-10 train
    state_n: int = 1_280_000  # ImageNet train, NAT paper
    state_d: int = 2048


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        _block(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _block(result) -> None:
    for t in tf.nest.flatten(result):
        if isinstance(t, tf.Tensor):
            t.numpy()


def _targets_vs_normal(cfg: Config) -> list[tuple[str, str, str]]:
    ids = tf.range(cfg.batch, dtype=tf.int32) * 4099 + 17  # arbitrary distinct ids
    seed = tf.constant([3, 5], tf.int32)
    targets = tf.function(lambda i: sphere_targets(i, cfg.state_d, seed=5))
    normal = tf.function(lambda s: tf.random.stateless_normal([cfg.batch, cfg.state_d], seed=s))
    # Interleave the two so that load from other processes hits both alike.
    t_targets, t_normal = [], []
    for _ in range(3):
        t_targets.append(_median_ms(lambda: targets(ids), cfg.repeats))
        t_normal.append(_median_ms(lambda: normal(seed), cfg.repeats))
    tt, tn = float(np.median(t_targets)), float(np.median(t_normal))
    shape = f"{cfg.batch} x {cfg.state_d}"
    return [
        (f"sphere_targets {shape}", f"{tt:.2f} ms", ""),
        (f"stateless_normal {shape}", f"{tn:.2f} ms", ""),
        ("  ratio targets / normal", f"{tt / tn:.2f}", "goal <= 2"),
    ]


def _assignment_times(cfg: Config) -> list[tuple[str, str, str]]:
    rows = []
    solve = tf.function(optimal_assignment)
    for b in (64, 256, 1024):
        z = tf.math.l2_normalize(tf.random.stateless_normal([b, cfg.state_d], seed=[b, 1]), 1)
        c = sphere_targets(tf.range(b), cfg.state_d, seed=b)
        cost = (2.0 - 2.0 * tf.matmul(z, c, transpose_b=True)).numpy()
        cost = tf.constant(cost)
        repeats = max(3, cfg.repeats // (1 if b < 1024 else 6))
        ms = _median_ms(lambda cost=cost: solve(cost), repeats)
        rows.append((f"optimal_assignment b={b}", f"{ms:.2f} ms", "scipy linear_sum_assignment"))
    return rows


def _state_bytes(cfg: Config) -> list[tuple[str, str, str]]:
    nat = NoiseAsTargets(cfg.state_n, cfg.state_d, seed=0)
    total = sum(v.shape.num_elements() * v.dtype.size for v in nat.variables)
    dense = cfg.state_n * cfg.state_d * 4
    return [
        (f"NAT state per image (n={cfg.state_n:,}, d={cfg.state_d})",
         f"{total / cfg.state_n:.0f} B", f"total {total / 1e6:.2f} MB"),
        ("  dense float32 target matrix per image", f"{dense / cfg.state_n:.0f} B",
         f"total {dense / 1e9:.2f} GB"),
    ]


def _training_step(cfg: Config) -> list[tuple[str, str, str]]:
    keras.utils.set_random_seed(0)
    model = build_model("nin_cifar10", input_shape=(32, 32, 3), head="nat",
                        feature_dim=cfg.feature_dim)
    optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    optimizer.build(model.trainable_variables)
    nat = NoiseAsTargets(cfg.num_examples, cfg.feature_dim, seed=0)
    images = tf.random.stateless_uniform([cfg.batch, 32, 32, 3], seed=[0, 1])

    @tf.function
    def step(idx, reassign):
        with tf.GradientTape() as tape:
            z = model(images, training=True)["embedding"]
            per_example, stats = nat(idx, z, reassign)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=cfg.batch)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss, stats["reassigned_fraction"]

    rng = np.random.default_rng(0)

    def batch_indices():
        return tf.constant(rng.choice(cfg.num_examples, cfg.batch, replace=False), tf.int32)

    on, off = tf.constant(True), tf.constant(False)
    for flag in (on, off):  # trace once, warm up both branches
        _block(step(batch_indices(), flag))
    times = {True: [], False: []}
    cpu = {True: [], False: []}
    moved = []
    for k in range(cfg.steps):
        order = (True, False) if k % 2 == 0 else (False, True)
        for flag in order:
            idx = batch_indices()
            start, start_cpu = time.perf_counter(), time.process_time()
            result = step(idx, on if flag else off)
            _block(result)
            times[flag].append(time.perf_counter() - start)
            cpu[flag].append(time.process_time() - start_cpu)
            if flag:
                moved.append(float(result[1]))
    t_on, t_off = (1e3 * float(np.min(times[f])) for f in (True, False))
    c_on, c_off = (1e3 * float(np.min(cpu[f])) for f in (True, False))

    # The NAT call alone, on fixed unit features of the same shape.
    z = tf.math.l2_normalize(
        tf.random.stateless_normal([cfg.batch, cfg.feature_dim], seed=[7, 7]), axis=1)
    call = tf.function(lambda idx, flag: nat(idx, z, flag)[0])
    idx = batch_indices()
    n_on, n_off = [], []
    for _ in range(3):
        n_on.append(_median_ms(lambda: call(idx, on), cfg.repeats))
        n_off.append(_median_ms(lambda: call(idx, off), cfg.repeats))
    n_on, n_off = float(np.median(n_on)), float(np.median(n_off))

    name = f"nin_cifar10 step, batch {cfg.batch}, d={cfg.feature_dim}"
    return [
        (f"{name}, re-assign on", f"{t_on:.1f} ms",
         f"best of {cfg.steps}; {np.mean(moved):.0%} of targets moved per step"),
        (f"{name}, re-assign off", f"{t_off:.1f} ms", f"best of {cfg.steps}"),
        ("  ratio on / off (measured, wall)", f"{t_on / t_off:.3f}", "goal <= 1.05"),
        (f"{name}, re-assign on, CPU time", f"{c_on:.1f} ms", "all threads of this process"),
        (f"{name}, re-assign off, CPU time", f"{c_off:.1f} ms", ""),
        ("  ratio on / off (measured, CPU)", f"{c_on / c_off:.3f}", "less sensitive to other load"),
        (f"NAT call alone, batch {cfg.batch}, d={cfg.feature_dim}, re-assign on", f"{n_on:.2f} ms",
         "targets + Hungarian + write + loss"),
        (f"NAT call alone, batch {cfg.batch}, d={cfg.feature_dim}, re-assign off",
         f"{n_off:.2f} ms", "targets + loss"),
        ("  ratio implied for the step", f"{(t_off + n_on - n_off) / t_off:.4f}",
         "(off step + NAT on - NAT off) / off step"),
    ]


def _print_table(rows: list[tuple[str, str, str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    header = ("measurement", "value", "note")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    line = "-+-".join("-" * w for w in widths)
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print(line)
    for row in rows:
        print(" | ".join([row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2]]))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cfg = Config(steps=_STEPS.value, feature_dim=_FEATURE_DIM.value, repeats=_REPEATS.value)
    devices = ", ".join(d.name for d in tf.config.list_logical_devices())
    print(f"devices: {devices}; TensorFlow {tf.__version__}")
    rows = _targets_vs_normal(cfg) + _assignment_times(cfg) + _state_bytes(cfg)
    rows += _training_step(cfg)
    _print_table(rows)


if __name__ == "__main__":
    app.run(main)
