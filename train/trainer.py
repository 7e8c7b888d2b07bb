"""The custom pretraining loop for NAT and SC. No flags: it takes a `TrainConfig`
(train/config.py).

One global step, on every replica (inside `strategy.run`):

    endpoints = model(images, training=True)                          one forward pass
    NAT: per_example, stats = nat(indices, endpoints["embedding"], reassign)
    SC:  per_example = sum_k w_k SC(endpoints[k]); patches seeded by (seed, step)
    loss = compute_average_loss(per_example, global_batch) + scale_regularization(wd/2 ||W||^2)
    gradients summed over replicas by the optimizer; SGD with momentum

`mixed_precision` builds the network under a Keras mixed policy and, for fp16, wraps the SGD
in a dynamic LossScaleOptimizer (models/precision.py: what stays float32, how the loss is
scaled, why a skipped fp16 step still counts). `jit_compile` compiles the forward pass and its
gradient with XLA, leaving NAT's Hungarian and assignment update outside
(train/compiled.py).

`steps_per_loop` steps run in one `tf.function` (`tf.range` loop). A loop never crosses an
epoch boundary, so the NAT re-assignment flag (every `nat_reassign_every`-th epoch, counting
from epoch 0; 0 = never, the paper's fixed-P baseline) is constant inside it.

Learning rate (NAT Sec. 3.3 and SC Sec. 5 combined):

    lr(t) = lr * scale / (1 + lr_gamma * max(0, t - lr_t0))

`scale` starts at 1 and is cut by `plateau_factor` when the epoch's mean loss has not gone
below the best one by `plateau_min_delta` for `plateau_patience` epochs (0: never cut).

Checkpoints hold everything a resumed run needs: the model (name-keyed, models/weights.py), the
optimizer (with its step counter), the fp16 loss scale, the NAT assignment, the epoch counter,
the plateau state and the run's fingerprint (seed, dataset size, global batch). They are
written every `checkpoint_every` steps and at each epoch end. A run may be resumed in another
precision (in fp16, a run saved without a loss scale starts from the initial scale). The data
stream and the SC patches are functions of (seed, step), so that is the whole random state. A run restarts from the latest
checkpoint in `model_dir`; otherwise it loads the backbone of `init_checkpoint`; otherwise it
starts fresh.

A non-finite loss stops the run (`NonFiniteLoss`, naming the step) without writing the
corrupted weights: the last good checkpoint is what remains.

At each epoch end the trainer calls its hooks, `hook(trainer, epochs_done)`, before the
epoch's checkpoint: the pretraining binary hands it the periodic probe (NAT Figure 2), so the
loop itself knows nothing of evaluation.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from data.pretrain import PretrainSource, open_source, pretrain_dataset, steps_per_epoch
from losses.nat import NoiseAsTargets
from losses.spatial_contrasting import multi_endpoint_loss
from models import build_model, precision
from models.runs import open_checkpoints, write_config
from models.weights import load_weights, named_variables
from train.compiled import network_forward
from train.config import TrainConfig


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; the message names the step."""


EpochHook = Callable[["Trainer", int], None]


class LearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """lr * scale / (1 + gamma * max(0, t - t0)); `scale` is a variable the plateau rule cuts."""

    def __init__(self, lr: float, t0: int, gamma: float, scale: tf.Variable):
        self.lr, self.t0, self.gamma, self.scale = float(lr), int(t0), float(gamma), scale

    def __call__(self, step):
        t = tf.cast(step, tf.float32)
        decay = 1.0 + self.gamma * tf.maximum(t - float(self.t0), 0.0)
        return self.lr * tf.cast(self.scale, tf.float32) / decay

    def get_config(self):
        return {"lr": self.lr, "t0": self.t0, "gamma": self.gamma}


def _is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes checkpoints, summaries and exports."""
    return bool(getattr(strategy.extended, "should_checkpoint", True))


def _l2(model: keras.Model) -> tf.Tensor:
    """sum of ||W||^2 over the kernels (not biases, not BN parameters)."""
    kernels = [v for v in model.trainable_variables if v.path.endswith("kernel")]
    return tf.add_n([tf.reduce_sum(tf.square(tf.cast(k, tf.float32))) for k in kernels])


@dataclass
class LoopResult:
    steps: int
    loss: float
    stats: dict[str, float]
    bad_step: int


class Trainer:
    """Builds the run inside `strategy.scope()` and trains it (see the module docstring)."""

    def __init__(self, config: TrainConfig, strategy: tf.distribute.Strategy,
                 source: PretrainSource | None = None, log: Callable[[str], None] = print,
                 hooks: Sequence[EpochHook] = ()):
        self.config = config
        self.strategy = strategy
        self.log = log
        self.hooks = tuple(hooks)
        self.chief = _is_chief(strategy)
        replicas = strategy.num_replicas_in_sync
        if config.batch_size % replicas:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                             f"{replicas} replicas")
        with strategy.scope():
            # A seeded init: the same config gives the same network, so runs are reproducible
            # and a resumed run continues exactly the uninterrupted one.
            keras.utils.set_random_seed(config.seed)
            self.model = build_model(config.model, precision=config.mixed_precision,
                                     **config.model_kwargs())
        self.input_shape = tuple(int(d) for d in self.model.input.shape[1:])
        self.forward, self.compiled = network_forward(self.model, strategy, self.input_shape,
                                                      config.jit_compile, self.log)
        self.source = source or open_source(config.dataset, self.input_shape, config.data_dir,
                                            config.manual_dir)
        if self.source.skipped:
            self.log(f"dataset {self.source.name}: skipped {len(self.source.skipped)} "
                     f"unreadable files (first: {self.source.skipped[0]})")
        self.steps_per_epoch = steps_per_epoch(self.source.num_examples, config.batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(f"dataset {self.source.name} has {self.source.num_examples} "
                             f"images, fewer than one batch of {config.batch_size}")
        self.total_steps = self.steps_per_epoch * config.epochs
        self.restored_from = self._restore(self._build_state())
        self.writer = (tf.summary.create_file_writer(os.path.join(config.model_dir, "train"))
                       if self.chief else tf.summary.create_noop_writer())
        self._loop_fn = None

    def _build_state(self) -> str | None:
        """The training state in the strategy's scope: counters, schedule, optimizer, NAT
        assignment and their checkpoint. Returns the checkpoint restored, if any."""
        config = self.config
        with self.strategy.scope():
            self.lr_scale = tf.Variable(1.0, trainable=False, name="lr_scale")
            self.best_loss = tf.Variable(np.inf, trainable=False, dtype=tf.float32,
                                         name="best_loss")
            self.bad_epochs = tf.Variable(0, trainable=False, dtype=tf.int64, name="bad_epochs")
            self.epoch = tf.Variable(0, trainable=False, dtype=tf.int64, name="epoch")
            self.fingerprint = tf.Variable(
                [config.seed, self.source.num_examples, config.batch_size], trainable=False,
                dtype=tf.int64, name="fingerprint")
            self.schedule = LearningRate(config.lr, config.lr_t0, config.lr_gamma, self.lr_scale)
            self.optimizer = precision.loss_scaled(
                keras.optimizers.SGD(learning_rate=self.schedule, momentum=config.momentum),
                config.mixed_precision)
            self.optimizer.build(self.model.trainable_variables)
            self.nat = None
            if config.method == "nat":
                self.nat = NoiseAsTargets(self.source.num_examples, config.nat_dim, config.seed,
                                          scope=config.nat_scope)
            objects = dict(model=named_variables(self.model),
                           **precision.checkpoint_objects(self.optimizer),
                           epoch=self.epoch, lr_scale=self.lr_scale, best_loss=self.best_loss,
                           bad_epochs=self.bad_epochs, fingerprint=self.fingerprint)
            if self.nat is not None:
                objects["nat"] = self.nat
            self._checkpoint_dir = config.model_dir if self.chief else tempfile.mkdtemp()
            self.checkpoint, self.manager, latest = open_checkpoints(
                config.model_dir, objects, config.keep_checkpoints, self._checkpoint_dir,
                optional=(precision.LOSS_SCALE_KEY,))
        return latest

    # ---------------------------------------------------------------------------------------
    # restore

    def _restore(self, latest: str | None) -> str:
        if latest:
            expected = [self.config.seed, self.source.num_examples, self.config.batch_size]
            found = [int(v) for v in self.fingerprint.numpy()]
            if found != expected:
                raise ValueError(
                    f"model_dir {self.config.model_dir} holds a run with (seed, images, batch) = "
                    f"{tuple(found)}, not {tuple(expected)}: use a new --model_dir")
            return f"resumed {latest} at step {self.step}"
        if self.config.init_checkpoint:
            report = load_weights(self.model, self.config.init_checkpoint)
            return (f"initialised {len(report.loaded)} weights from {report.checkpoint} "
                    f"({len(report.missing)} left at random init)")
        return "fresh start"

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    # ---------------------------------------------------------------------------------------
    # the step

    def _replica_step(self, batch, reassign):
        cfg = self.config
        indices, images = batch
        step = tf.cast(self.optimizer.iterations, tf.int64)
        with tf.GradientTape() as tape:
            endpoints = self.forward(images)
            if self.nat is not None:
                per_example, nat_stats = self.nat(indices, endpoints["embedding"], reassign)
                stats = {"nat/reassigned_fraction": nat_stats["reassigned_fraction"]}
            else:
                seed = tf.stack([tf.constant(cfg.seed, tf.int64), step])
                out = multi_endpoint_loss(endpoints, cfg.sc_weights, cfg.sc_window, seed,
                                          pool=cfg.sc_pool, squared=cfg.sc_squared,
                                          symmetric=cfg.sc_symmetric)
                per_example = out.total
                stats = {f"sc/patch_accuracy/{k}": tf.reduce_mean(v)
                         for k, v in out.accuracy.items()}
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=cfg.batch_size)
            if cfg.weight_decay > 0:
                loss += tf.nn.scale_regularization_loss(0.5 * cfg.weight_decay * _l2(self.model))
            if cfg.inject_nan_at_step >= 0:
                loss += tf.where(step == cfg.inject_nan_at_step, np.nan, 0.0)
            target = precision.scale_loss(self.optimizer, loss)
        variables = self.model.trainable_variables
        grads = precision.unscaled_gradients(self.optimizer, tape, target, variables)
        precision.apply_gradients(self.optimizer, grads, variables)
        return loss, stats

    def _stat_names(self) -> list[str]:
        if self.nat is not None:
            return ["nat/reassigned_fraction"]
        return [f"sc/patch_accuracy/{k}" for k in sorted(self.config.sc_weights)]

    def _build_loop(self):
        strategy = self.strategy
        names = self._stat_names()

        @tf.function
        def loop(iterator, num_steps, reassign):
            loss_sum = tf.constant(0.0)
            stat_sums = [tf.constant(0.0) for _ in names]
            bad_step = tf.constant(-1, tf.int64)
            done = tf.constant(0)
            for _ in tf.range(num_steps):
                step = tf.cast(self.optimizer.iterations, tf.int64)
                # `reassign` is the same on every replica: captured, not distributed.
                loss, stats = strategy.run(lambda batch: self._replica_step(batch, reassign),
                                           args=(next(iterator),))
                loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
                if not tf.math.is_finite(loss):
                    bad_step = step
                    break
                loss_sum += loss
                stat_sums = [s + strategy.reduce(tf.distribute.ReduceOp.MEAN, stats[n], axis=None)
                             for s, n in zip(stat_sums, names, strict=True)]
                done += 1
            return done, loss_sum, stat_sums, bad_step

        return loop

    def make_iterator(self, start_step: int):
        """An iterator over the distributed stream, starting after `start_step` global steps."""
        cfg = self.config
        augment = cfg.augment
        dataset = self.strategy.distribute_datasets_from_function(
            lambda ctx: pretrain_dataset(self.source, cfg.batch_size, augment, cfg.seed,
                                         cfg.epochs, start_step=start_step, input_context=ctx))
        return iter(dataset)

    def run_steps(self, iterator, num_steps: int, reassign: bool) -> LoopResult:
        """Run `num_steps` training steps in one tf.function call (stops early on NaN/Inf)."""
        if self._loop_fn is None:
            self._loop_fn = self._build_loop()
        done, loss_sum, stat_sums, bad_step = self._loop_fn(
            iterator, tf.constant(num_steps), tf.constant(reassign))
        done = int(done)
        stats = {n: float(s) / max(done, 1)
                 for n, s in zip(self._stat_names(), stat_sums, strict=True)}
        return LoopResult(done, float(loss_sum) / max(done, 1), stats, int(bad_step))

    # ---------------------------------------------------------------------------------------
    # epochs

    def _reassign(self, epoch: int) -> bool:
        k = self.config.nat_reassign_every
        return self.nat is not None and k > 0 and epoch % k == 0

    def _end_epoch(self, epoch: int, mean_loss: float) -> None:
        cfg = self.config
        if cfg.plateau_patience > 0:
            if mean_loss < float(self.best_loss.numpy()) - cfg.plateau_min_delta:
                self.best_loss.assign(mean_loss)
                self.bad_epochs.assign(0)
            else:
                self.bad_epochs.assign_add(1)
                if int(self.bad_epochs.numpy()) >= cfg.plateau_patience:
                    self.lr_scale.assign(self.lr_scale * cfg.plateau_factor)
                    self.bad_epochs.assign(0)
                    self.log(f"epoch {epoch + 1}: loss plateaued at {mean_loss:.4f}; "
                             f"lr scale now {float(self.lr_scale.numpy()):.3g}")
        self.epoch.assign(epoch + 1)

    def train(self) -> dict:
        """Train up to `epochs` epochs (resuming where the checkpoint left off).

        Returns a summary dict: steps, epochs, final epoch loss.
        Raises NonFiniteLoss on a NaN/Inf loss (nothing is written after the last good step).
        """
        cfg = self.config
        start = self.step
        self.log(self.describe())
        if start >= self.total_steps:
            return self._summary(float("nan"))

        iterator = self.make_iterator(start)
        progbar = keras.utils.Progbar(self.total_steps, stateful_metrics=["loss", "img/s", "lr"],
                                      unit_name="step", verbose=1 if self.chief else 0)
        progbar.update(start)
        since_save = 0
        epoch_loss, epoch_steps = 0.0, 0
        last_loss = float("nan")
        while self.step < self.total_steps:
            step = self.step
            epoch, in_epoch = divmod(step, self.steps_per_epoch)
            n = min(cfg.steps_per_loop, self.steps_per_epoch - in_epoch)
            t0 = time.perf_counter()
            result = self.run_steps(iterator, n, self._reassign(epoch))
            elapsed = time.perf_counter() - t0
            if result.bad_step >= 0:
                raise NonFiniteLoss(
                    f"loss is not finite at step {result.bad_step} (epoch {epoch + 1}); stopped "
                    f"without saving: the last good checkpoint is "
                    f"{self.manager.latest_checkpoint or 'none'}")
            images_per_sec = result.steps * cfg.batch_size / max(elapsed, 1e-9)
            lr = float(self.schedule(self.optimizer.iterations))
            epoch_loss += result.loss * result.steps
            epoch_steps += result.steps
            last_loss = result.loss
            with self.writer.as_default(step=self.step):
                tf.summary.scalar("loss", result.loss)
                tf.summary.scalar("lr", lr)
                tf.summary.scalar("images_per_sec", images_per_sec)
                for name, value in result.stats.items():
                    tf.summary.scalar(name, value)
            progbar.update(self.step, [("loss", result.loss), ("img/s", images_per_sec),
                                       ("lr", lr)])
            since_save += result.steps
            if in_epoch + n == self.steps_per_epoch:
                mean = epoch_loss / max(epoch_steps, 1)
                self._end_epoch(epoch, mean)
                epoch_loss, epoch_steps = 0.0, 0
                for hook in self.hooks:
                    hook(self, epoch + 1)
                self.manager.save(checkpoint_number=self.step)
                since_save = 0
            elif since_save >= cfg.checkpoint_every:
                self.manager.save(checkpoint_number=self.step)
                since_save = 0
        self.writer.flush()
        return self._summary(last_loss)

    def describe(self) -> str:
        """One line: method, data, network, precision, XLA, replicas, steps, where it starts."""
        cfg = self.config
        compute = "" if cfg.mixed_precision == "none" else f", {cfg.mixed_precision}"
        compute += ", XLA" if self.compiled else ""
        return (f"{cfg.method} on {self.source.name} ({self.source.num_examples} images) with "
                f"{cfg.model}{compute}, {self.strategy.num_replicas_in_sync} replica(s), "
                f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs; {self.restored_from}")

    def _summary(self, last_loss: float) -> dict:
        return {"steps": self.step, "epochs": int(self.epoch.numpy()), "last_loss": last_loss}

    def close(self) -> None:
        if not self.chief:
            shutil.rmtree(self._checkpoint_dir, ignore_errors=True)


def write_run_config(config: TrainConfig) -> str:
    """Write the run's `<model_dir>/config.json`; returns its path."""
    return write_config(config.model_dir, config.to_json())
