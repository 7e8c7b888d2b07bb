"""Training-step throughput of the zoo's real settings, on whatever device there is.

    python -m benchmarks.gpu_throughput            # on a GPU: batch 256, a few minutes
    python -m benchmarks.gpu_throughput --quick    # small batches: a few minutes on a CPU

Rows: one training step (forward, loss, backward, SGD update; `strategy.run` in the
Trainer's tf.function loop) of
    alexnet 224x224   NAT (head d = 2048) with re-assignment on and off, and supervised
                      softmax on 1000 classes with the same trunk (fc7 -> one Dense layer)
    nin_stl10 96x96   SC at `sc` (windows of 30% of the map), and supervised (its softmax head)
    nin_cifar10 32x32 SC, and supervised
for every precision (none = float32, bf16, fp16 with loss scaling; models/precision.py,
losses/loss_scale.py) with
XLA off and on (--jit_compile; train/compiled.py). NAT and SC steps are the pretraining
Trainer's own; the supervised step is benchmarks/steps.py's with the same precision
and XLA helpers; neither has weight decay (its L2 term would cost both the same). Every step
trains on one fixed batch of random images, so the input pipeline is not measured
(benchmarks/input_pipeline.py does that). The rows of a (model, precision,
XLA) cell are interleaved over `--rounds` rounds of `--steps` steps; medians are reported.

How to read it:
- images/s: batch x steps / time. "time / supervised" is this row's step time over the
  supervised step's in the same cell: for NAT with re-assignment it is NAT Table 1's "barely
  less efficient" (goal <= 1.05: at most 5% slower than supervised training).
- NAT re-assignment on / off: the cost of the Hungarian epochs (one in three in the paper).
- bf16 and fp16 should roughly double a recent GPU's throughput over float32 for the conv
  layers; on a CPU without bfloat16 or float16 arithmetic they are emulated and slower, and
  XLA fuses the casts away. "XLA n/a" means the step fell back to the plain one (the reason is
  printed once).
- The Hungarian table: scipy's linear_sum_assignment on a B x B cost (unit features against
  sphere targets, d = 2048) for global batches B = 256 ... 4096, beside the measured NAT step
  time of one replica (AlexNet, float32, XLA off, re-assignment on). With --nat_scope=global
  every replica waits for the B x B solution each step of a re-assignment epoch, so its share
  of the step is scipy / (step + scipy) for B / b replicas of batch b; with the default
  --nat_scope=replica each replica solves only b x b. When the share grows past a few
  percent, global scope is no longer free.

    python -m benchmarks.gpu_throughput --assignment   # only the global-scope assignment table

The assignment table: the NAT module's own step (`NoiseAsTargets(scope="global")` under
`strategy.run` in a tf.function, d = 2048, no network) on a global batch B split over R
replicas (OneDevice for R = 1, MirroredStrategy over R GPUs, else over R logical CPUs of this
host). Per step: the solver's calls, the host time spent in them (summed over the calls,
timed around scipy by wrapping the module's solver), and the step's wall time with
re-assignment on and off (on - off: what re-assignment adds to a step: the B x B cost and the
solve). Each step alternates between two random feature batches, so every solve has targets to
trade. Logical CPUs share the host's cores: replicas that solve concurrently overlap at most
as many solves as there are free cores (the output prints the core count and load).
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

from runtime.cli import quiet_tensorflow

quiet_tensorflow()  # the zoo's quiet start: no TensorFlow start-up lines

import numpy as np
import scipy.optimize
import tensorflow as tf
from absl import app, flags, logging

from benchmarks.steps import SupervisedStep, fixed_batches, synthetic_source
from losses import nat as nat_lib
from losses.nat import NoiseAsTargets, sphere_targets
from models import PRECISIONS
from train.config import TrainConfig
from train.strategy import make_strategy, split_cpu
from train.trainer import Trainer

_QUICK = flags.DEFINE_boolean("quick", False, "A size for a CPU: batch 4, 1 step, 1 round "
                              "(the same rows).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Batch of every step.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per round and row.", lower_bound=1)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds (median reported).", lower_bound=1)
_ASSIGNMENT = flags.DEFINE_boolean("assignment", False, "Only the NAT global-scope assignment "
                                   "table: B x B solves per step for 1, 2 and 4 replicas.")

WORKLOADS = (  # model, input size, pretraining method
    ("alexnet", 224, "nat"),
    ("nin_stl10", 96, "sc"),
    ("nin_cifar10", 32, "sc"),
)
GLOBAL_BATCHES = (256, 1024, 2048, 4096)
ASSIGNMENT_BATCHES = (1024, 2048, 4096)  # --quick: 64, 128, 256
ASSIGNMENT_REPLICAS = (1, 2, 4)
NAT_DIM = 2048


def _sizes() -> tuple[int, int, int]:
    """(batch, steps, rounds)."""
    if _QUICK.value:
        return 4, 1, 1
    return _BATCH.value, _STEPS.value, _ROUNDS.value


def _cell(strategy, model: str, size: int, method: str, prec: str, jit: bool, batch: int,
          tmp: str, notes: set[str]) -> dict[str, Callable[[object, int], object]]:
    """{row: run_steps(iterator, n)} of one (model, precision, XLA) cell."""
    shape = (size, size, 3)
    config = TrainConfig(model_dir=os.path.join(tmp, f"{model}_{prec}_{jit}"), method=method,
                         model=model, input_shape=f"{size},{size},3", dataset="folder:none",
                         batch_size=batch, nat_dim=NAT_DIM, mixed_precision=prec,
                         jit_compile=jit, weight_decay=0.0)
    trainer = Trainer(config, strategy, source=synthetic_source(shape, 4 * batch),
                      log=notes.add)
    classes = 1000 if model == "alexnet" else 10
    supervised = SupervisedStep(model, shape, np.arange(batch) % classes, batch, strategy,
                                num_classes=classes, mixed_precision=prec, jit_compile=jit,
                                log=notes.add)
    xla = "XLA" if trainer.compiled else ("XLA n/a" if jit else "")
    if method == "nat":
        rows = {"NAT, re-assign on": lambda it, n: trainer.run_steps(it, n, True),
                "NAT, re-assign off": lambda it, n: trainer.run_steps(it, n, False)}
    else:
        rows = {"SC": lambda it, n: trainer.run_steps(it, n, False)}
    rows["supervised"] = supervised.run_steps
    return {f"{name}|{xla}": step for name, step in rows.items()}


def _time_cell(rows: dict, iterator, steps: int, rounds: int) -> dict[str, float]:
    """Median seconds per step of each row, rows interleaved."""
    for step in rows.values():
        step(iterator, steps)  # trace, compile, warm up
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, step in rows.items():
            start = time.perf_counter()
            step(iterator, steps)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def _hungarian_ms(size: int) -> float:
    """Median milliseconds of scipy's assignment on a size x size NAT cost (d = 2048)."""
    z = tf.math.l2_normalize(tf.random.stateless_normal([size, NAT_DIM], seed=[size, 1]), 1)
    c = sphere_targets(tf.range(size), NAT_DIM, seed=size)
    cost = (2.0 - 2.0 * tf.matmul(z, c, transpose_b=True)).numpy()
    times = []
    for _ in range(3 if size <= 1024 else 1):
        start = time.perf_counter()
        scipy.optimize.linear_sum_assignment(cost)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


class _SolverClock:
    """Times every call of the NAT module's host solver while active (installed before the
    steps are traced: tf.py_function looks the solver up then)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def __enter__(self) -> _SolverClock:
        self._real = real = nat_lib._solve_assignment

        def timed(cost):
            start = time.perf_counter()
            try:
                return real(cost)
            finally:
                self.seconds.append(time.perf_counter() - start)

        nat_lib._solve_assignment = timed
        return self

    def __exit__(self, *exc) -> None:
        nat_lib._solve_assignment = self._real


def _replica_strategy(replicas: int) -> tf.distribute.Strategy:
    if replicas == 1:
        return make_strategy("one_device")
    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus if len(gpus) >= replicas else tf.config.list_logical_devices("CPU")
    # Strategies of one process start their collective group keys at the same base, and a key
    # that two device sets share aborts the collective; each replica count gets a base of its
    # own (the class attribute TensorFlow's tests set, read at construction only).
    cls = tf.distribute.MirroredStrategy
    saved, cls._collective_key_base = cls._collective_key_base, 100_000 * replicas
    try:
        return cls([d.name for d in devices[:replicas]])
    finally:
        cls._collective_key_base = saved


def _assignment_row(strategy, size: int, clock: _SolverClock, rounds: int) -> tuple:
    """(solves per step, solver host s per step, step s with re-assignment on, off): medians."""
    local = size // strategy.num_replicas_in_sync
    with strategy.scope():
        nat = NoiseAsTargets(size, NAT_DIM, seed=size, scope="global")

    def split(array):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: array[ctx.replica_id_in_sync_group * local:
                              (ctx.replica_id_in_sync_group + 1) * local])

    indices = split(tf.range(size, dtype=tf.int32))
    batches = [split(tf.math.l2_normalize(
        tf.random.stateless_normal([size, NAT_DIM], seed=[size, k]), 1)) for k in (1, 2)]
    step = tf.function(lambda i, z, flag: strategy.experimental_local_results(
        strategy.run(nat, (i, z, flag))[1]["loss_after"]))
    measured = {}
    for reassign in (True, False):
        flag = tf.constant(reassign)
        for z in batches:
            step(indices, z, flag)  # trace, warm up
        calls, solver, wall = [], [], []
        for _ in range(rounds):
            for z in batches:
                clock.seconds.clear()
                start = time.perf_counter()
                [x.numpy() for x in step(indices, z, flag)]
                wall.append(time.perf_counter() - start)
                calls.append(len(clock.seconds))
                solver.append(sum(clock.seconds))
        measured[reassign] = (statistics.median(calls), statistics.median(solver),
                              statistics.median(wall))
    return measured[True][0], measured[True][1], measured[True][2], measured[False][2]


def assignment_main() -> None:
    """The --assignment table (see the module docstring)."""
    sizes = (64, 128, 256) if _QUICK.value else ASSIGNMENT_BATCHES
    rounds = 1 if _QUICK.value else _ROUNDS.value
    kind = "GPU" if len(tf.config.list_logical_devices("GPU")) >= max(ASSIGNMENT_REPLICAS) \
        else "logical CPU"
    print(f"NAT global-scope assignment per step, d = {NAT_DIM}; replicas on {kind}s; host "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; TensorFlow "
          f"{tf.__version__}; median of {rounds} rounds x 2 steps\n")
    print(f"| {'global batch B':>14} | {'replicas':>8} | {'solves/step':>11} "
          f"| {'solver host ms/step':>19} | {'step ms, on':>11} | {'step ms, off':>12} "
          f"| {'on - off ms':>11} |")
    print(f"|{'-' * 16}|{'-' * 10}|{'-' * 13}|{'-' * 21}|{'-' * 13}|{'-' * 14}|{'-' * 13}|")
    strategies = {r: _replica_strategy(r) for r in ASSIGNMENT_REPLICAS}
    with _SolverClock() as clock:
        for size in sizes:
            for replicas, strategy in strategies.items():
                calls, solver, on, off = _assignment_row(strategy, size, clock, rounds)
                print(f"| {size:>14} | {replicas:>8} | {calls:>11g} | {1e3 * solver:>19.1f} "
                      f"| {1e3 * on:>11.0f} | {1e3 * off:>12.0f} | {1e3 * (on - off):>11.0f} |",
                      flush=True)
                gc.collect()
    if kind == "logical CPU":
        print(f"\nnote: the replicas are logical CPUs sharing this host's {os.cpu_count()} "
              "cores, so replicas solving concurrently overlap at most that many solves.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.ERROR)  # tf.function's notes on retracing: one per cell
    if _ASSIGNMENT.value:
        if len(tf.config.list_physical_devices("GPU")) < max(ASSIGNMENT_REPLICAS):
            split_cpu(max(ASSIGNMENT_REPLICAS))
        assignment_main()
        return
    strategy = make_strategy("one_device")
    device = strategy.extended.worker_devices[0]
    batch, steps, rounds = _sizes()
    tmp = tempfile.mkdtemp()
    notes: set[str] = set()
    results = []  # (model, size, row, precision, xla, seconds per step, supervised seconds)
    for model, size, method in WORKLOADS:
        iterator = fixed_batches(strategy, batch, size)
        for prec in PRECISIONS:
            for jit in (False, True):
                start = time.perf_counter()
                rows = _cell(strategy, model, size, method, prec, jit, batch, tmp, notes)
                seconds = _time_cell(rows, iterator, steps, rounds)
                print(f"{model} {prec} XLA {'on' if jit else 'off'}: "
                      f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
                base = next(v for k, v in seconds.items() if k.startswith("supervised"))
                for key, value in seconds.items():
                    name, xla = key.split("|")
                    results.append((model, size, name, prec, xla, value, base))
                del rows
                gc.collect()
    hungarian = [(b, _hungarian_ms(b)) for b in GLOBAL_BATCHES]
    _print(device, batch, steps, rounds, results, hungarian, notes)


def _print(device, batch, steps, rounds, results, hungarian, notes) -> None:
    print(f"device {device}; TensorFlow {tf.__version__}; batch {batch}; median of {rounds} "
          f"rounds x {steps} steps{' (--quick)' if _QUICK.value else ''}\n")
    print(f"| {'model':<17} | {'step':<19} | {'precision':<9} | {'XLA':<7} | {'images/s':>9} "
          f"| {'ms/step':>9} | {'time / supervised':>17} |")
    print(f"|{'-' * 19}|{'-' * 21}|{'-' * 11}|{'-' * 9}|{'-' * 11}|{'-' * 11}|{'-' * 19}|")
    for model, size, name, prec, xla, seconds, base in results:
        print(f"| {f'{model} {size}':<17} | {name:<19} | {prec:<9} | {xla:<7} | "
              f"{batch / seconds:>9.1f} | {1e3 * seconds:>9.1f} | {seconds / base:>17.2f} |")
    for note in sorted(notes):
        print(f"note: {note}")
    step = next(s for m, _, n, p, x, s, _ in results
                if m == "alexnet" and n == "NAT, re-assign on" and p == "none" and not x)
    print(f"\nHungarian (scipy linear_sum_assignment, d = {NAT_DIM}) beside one replica's "
          f"AlexNet NAT step ({1e3 * step:.0f} ms at batch {batch}, float32, XLA off)\n")
    print(f"| {'global batch B':>14} | {'replicas':>8} | {'B x B ms':>9} | {'share, global':>13} "
          f"| {'b x b ms':>8} | {'share, replica':>14} |")
    print(f"|{'-' * 16}|{'-' * 10}|{'-' * 11}|{'-' * 15}|{'-' * 10}|{'-' * 16}|")
    local = _hungarian_ms(batch)
    for size, ms in hungarian:
        share = ms / (ms + 1e3 * step)
        print(f"| {size:>14} | {max(size // batch, 1):>8} | {ms:>9.1f} | {share:>13.1%} | "
              f"{local:>8.2f} | {local / (local + 1e3 * step):>14.2%} |")


if __name__ == "__main__":
    app.run(main)
