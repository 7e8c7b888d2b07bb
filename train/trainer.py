"""The custom pretraining loop for NAT and SC. No flags: it takes a `TrainConfig`
(train/config.py).

One global step, on every replica (inside `strategy.run`):

    endpoints = model(images, training=True)                          one forward pass
    NAT: per_example, stats = nat(indices, endpoints["embedding"], reassign)
    SC:  per_example = sum_k w_k SC(endpoints[k]); patches seeded by (seed, step)
    loss = compute_average_loss(per_example, global_batch) + scale_regularization(wd/2 ||W||^2)
    gradients summed over replicas by the optimizer; SGD with momentum

`mixed_precision`: a Keras mixed policy, and for fp16 a loss-scaled SGD (losses/loss_scale.py).
`jit_compile`: the forward pass and its gradient in XLA, the Hungarian outside (train/compiled.py).
`deterministic`: `tf.config.experimental.enable_op_determinism()`, with every seed set, before
the model is built (it stays on for the process). CPU kernels are deterministic without it; on
GPU it is what makes a resume bitwise exact (cuDNN convolutions and the gradients of SC's
gathers otherwise add in a varying order), at a cost: slower steps, and ops without a
deterministic GPU kernel raise.

`steps_per_loop` steps run in one `tf.function` (`tf.range` loop). A loop never crosses an
epoch boundary, so the NAT re-assignment flag (every `nat_reassign_every`-th epoch, counting
from epoch 0; 0 = never, the paper's fixed-P baseline) is constant inside it.

Learning rate: lr * scale / (1 + lr_gamma * max(0, t - lr_t0)) (NAT Sec. 3.3 and SC Sec. 5
combined), `scale` cut on a loss plateau; its state is checkpointed (train/schedule.py).

The run folder belongs to the trainer (on the chief; every worker restores from it, see
train/cluster.py): it is locked, and its fingerprint (`TrainConfig.fingerprint`: every setting that
changes the result, plus the number of images, a folder's file list, the input pipelines and
NAT's problem size) is compared with the recorded one before anything is restored or written
(runtime/ownership.py). Only then are config.json, a folder's file list (images.txt) and the files
the folder scan left out (skipped.json) written; temporaries of a dead process are removed
first, and named.

Checkpoints hold everything a resumed run needs: the model (name-keyed, models/weights.py), the
optimizer (with its step counter), the fp16 loss scale, the NAT assignment, the epoch counter,
the plateau state (with the current epoch's loss sum) and the mean loss of the last loop (for
the results of any later process). They are written every `checkpoint_every` steps and at each
epoch end. The data stream and the SC patches are functions of (seed, step), so that is the
whole random state: on the same kind of machine, with the same devices and settings, a resumed
run ends bitwise equal to an uninterrupted one (on GPU only with `deterministic`). A run
restarts from the newest intact checkpoint in `model_dir`; otherwise it loads the backbone of
`pretrained`; otherwise it starts fresh. Image files that fail to load during training
are dropped and refilled (data/pretrain.py), logged and added to skipped.json.

A non-finite loss stops the run (`NonFiniteLoss`, naming the step) without writing the
corrupted weights: the last good checkpoint is what remains.

At each epoch end, before the epoch's checkpoint, the trainer calls its hooks with what they
need, `hook(model, epochs_done, step, writer, log, chief)`: the pretraining binary hands it
the periodic probe (NAT Figure 2), so the loop itself knows nothing of evaluation.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from data import DataError
from data.pretrain import (
    PretrainSource,
    open_source,
    steps_per_epoch,
)
from data.service import pretrain_stream
from losses import loss_scale
from losses.divergence import NonFiniteLoss
from losses.nat import NoiseAsTargets
from losses.spatial_contrasting import multi_endpoint_loss
from models import build_model
from models.checkpoints import open_checkpoints
from models.runs import load_backbone
from models.weights import named_variables
from runtime.ownership import abandon_run, claim_run, start_run
from runtime.progress import Progress
from train import cluster, records
from train.compiled import network_forward
from train.config import TrainConfig
from train.schedule import LearningRate, Plateau
from train.strategy import input_pipelines

EpochHook = Callable[[keras.Model, int, int, object, Callable[[str], None], bool], None]


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
        self.chief = cluster.is_chief(strategy)
        if config.deterministic:  # before any op: unseeded random ops would raise
            keras.utils.set_random_seed(config.seed)
            tf.config.experimental.enable_op_determinism()
        replicas = strategy.num_replicas_in_sync
        if config.batch_size % replicas:
            raise DataError(f"batch_size {config.batch_size} is not divisible by the "
                            f"{replicas} replicas")
        self.claim = None
        if self.chief:  # lock first: a second process stops before opening any data
            self.claim = cluster.claim(claim_run, config.model_dir,
                                       lambda: self._open_data(source))
        else:
            self._open_data(source)
        try:
            self._build_state()
            if self.claim is not None:
                start_run(self.claim, config.to_json())
                self._record_data()
        except BaseException:
            if self.claim is not None:
                abandon_run(self.claim)
            raise
        if self.claim is not None and self.claim.removed:
            self.log(f"removed {len(self.claim.removed)} temporary files of an interrupted "
                     f"process from {config.model_dir}: {', '.join(self.claim.removed)}")
        # TensorBoard summaries, opened by `train` once there is a step to write about.
        self.writer = tf.summary.create_noop_writer()
        self._loop_fn = None

    def _open_data(self, source: PretrainSource | None) -> dict:
        """Build the (seeded) model, open the data; returns the run's fingerprint."""
        cfg = self.config
        with self.strategy.scope():
            # A seeded init: the same config gives the same network, so runs are reproducible
            # and a resumed run continues exactly the uninterrupted one.
            keras.utils.set_random_seed(cfg.seed)
            self.model = build_model(cfg.model, precision=cfg.mixed_precision,
                                     **cfg.model_kwargs())
        self.input_shape = tuple(int(d) for d in self.model.input.shape[1:])
        self.forward, self.compiled = network_forward(self.model, self.strategy,
                                                      self.input_shape, cfg.jit_compile,
                                                      self.log)
        self.source = source or open_source(cfg.dataset, self.input_shape, cfg.data_dir,
                                            cfg.manual_dir, records.recorded_images(cfg.model_dir))
        self.steps_per_epoch = steps_per_epoch(self.source.num_examples, cfg.batch_size)
        if self.steps_per_epoch < 1:
            raise DataError(f"dataset {self.source.name} has {self.source.num_examples} "
                            f"images, fewer than one batch of {cfg.batch_size}")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        files = records.images_digest(self._files()) if self.source.paths else None
        return cfg.fingerprint(self.source.num_examples, files, input_pipelines(self.strategy),
                               self.strategy.num_replicas_in_sync)

    def _files(self) -> list[str]:
        return [os.path.relpath(p, self.source.root) for p in self.source.paths]

    def _build_state(self) -> None:
        """Variables, optimizer, NAT state and checkpoint, restored from the latest one."""
        cfg = self.config
        with self.strategy.scope():
            self.plateau = Plateau(cfg.plateau_patience, cfg.plateau_factor,
                                   cfg.plateau_min_delta)
            self.epoch = tf.Variable(0, trainable=False, dtype=tf.int64, name="epoch")
            self.last_loss = tf.Variable(np.nan, trainable=False, dtype=tf.float64,
                                         name="last_loss")
            self.schedule = LearningRate(cfg.lr, cfg.lr_t0, cfg.lr_gamma, self.plateau.scale)
            self.optimizer = loss_scale.loss_scaled(
                keras.optimizers.SGD(learning_rate=self.schedule, momentum=cfg.momentum),
                cfg.mixed_precision)
            self.optimizer.build(self.model.trainable_variables)
            self.nat = None
            if cfg.method == "nat":
                self.nat = NoiseAsTargets(self.source.num_examples, cfg.nat_dim, cfg.seed,
                                          scope=cfg.nat_scope, targets=cfg.nat_targets)
            objects = dict(model=named_variables(self.model),
                           **loss_scale.checkpoint_objects(self.optimizer),
                           epoch=self.epoch, last_loss=self.last_loss,
                           **self.plateau.checkpoint_objects())
            if self.nat is not None:
                objects["nat"] = self.nat
            cluster.check_same_start(self.strategy, cfg.model_dir)
            self._checkpoint_dir = cluster.checkpoint_dir(cfg.model_dir, self.strategy)
            self.checkpoint, self.manager, latest = open_checkpoints(
                cfg.model_dir, objects, cfg.keep_checkpoints, self._checkpoint_dir,
                optional=(loss_scale.LOSS_SCALE_KEY,))
        self.restored_from, self._saved_step = self._restore(latest), self.step
        self.preemption = cluster.Preemption(self.strategy, self.manager, self._save,
                                             lambda: self.step, cfg.model_dir)

    def _record_data(self) -> None:
        """images.txt (first start) and the files the folder scan left out."""
        note = records.record_source(self.config.model_dir, self.source, self._files())
        if note:
            self.log(note)

    def _note_failures(self) -> None:
        """Log and record the files that failed to load since the last call."""
        failures = self.source.failures
        new = failures.drain() if failures is not None else []
        if new and self.chief:
            new = records.record_skipped(self.config.model_dir, new, "training")
        for path, reason in new:
            self.log(f"skipped {path}: {reason}; batches are refilled from the epoch's "
                     f"other images (listed in {records.SKIPPED})")

    # ---------------------------------------------------------------------------------------
    # restore

    def _restore(self, latest: str | None) -> str:
        if latest:
            return f"resumed {latest} at step {self.step}"
        if self.config.pretrained:  # the backbone only (models/runs.py)
            return load_backbone(self.model, self.config.pretrained, self.config.model)[1]
        return "fresh start"

    @property
    def finished(self) -> bool:
        """True when every step of the run's epochs is done."""
        return self.step >= self.total_steps

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
            target = loss_scale.scale_loss(self.optimizer, loss)
        variables = self.model.trainable_variables
        grads = loss_scale.unscaled_gradients(self.optimizer, tape, target, variables)
        loss_scale.apply_gradients(self.optimizer, grads, variables)
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
                self.plateau.add(loss)
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
            lambda ctx: pretrain_stream(cfg.data_service, self.source, cfg.batch_size, augment,
                                        cfg.seed, cfg.epochs, start_step, input_context=ctx))
        return iter(dataset)

    def run_steps(self, iterator, num_steps: int, reassign: bool) -> LoopResult:
        """Run `num_steps` training steps in one tf.function call (stops early on NaN/Inf)."""
        if self._loop_fn is None:
            self._loop_fn = self._build_loop()
        done, loss_sum, stat_sums, bad_step = self.preemption.run(
            self._loop_fn, iterator, tf.constant(num_steps), tf.constant(reassign))
        done = int(done)
        stats = {n: float(s) / max(done, 1)
                 for n, s in zip(self._stat_names(), stat_sums, strict=True)}
        return LoopResult(done, float(loss_sum) / max(done, 1), stats, int(bad_step))

    # ---------------------------------------------------------------------------------------
    # epochs

    def _reassign(self, epoch: int) -> bool:
        k = self.config.nat_reassign_every
        return self.nat is not None and k > 0 and epoch % k == 0

    def _end_epoch(self, epoch: int) -> None:
        mean_loss, cut = self.plateau.end_epoch()
        if cut:
            self.log(f"epoch {epoch + 1}: loss plateaued at {mean_loss:.4f}; "
                     f"lr scale now {float(self.plateau.scale.numpy()):.3g}")
        self.epoch.assign(epoch + 1)

    def train(self) -> dict:
        """Train up to `epochs` epochs (resuming where the checkpoint left off).

        Returns a summary dict: steps, epochs, last_loss (the mean loss of the last loop).
        Raises NonFiniteLoss on a NaN/Inf loss (nothing is written after the last good step).
        """
        cfg = self.config
        start = self.step
        self.log(self.describe())
        if start >= self.total_steps:
            return self._summary()
        if self.chief:
            self.writer = tf.summary.create_file_writer(os.path.join(cfg.model_dir, "train"))
        iterator = self.make_iterator(start)
        bar = Progress(self.total_steps, f"{cfg.method} pretraining", unit=" steps",
                       stream=None if self.chief else io.StringIO())
        say, self.log = self.log, bar.log  # messages while training never share the bar's line
        try:
            self._steps(iterator, bar)
        finally:
            bar.close()
            self.log = say
        self.writer.flush()
        return self._summary()

    def _steps(self, iterator, bar: Progress) -> None:
        """The loop of `train`: steps, summaries, epoch ends (hooks), checkpoints."""
        cfg = self.config
        since_save = 0
        while self.step < self.total_steps:
            epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
            n = min(cfg.steps_per_loop, self.steps_per_epoch - in_epoch)
            result, elapsed = self._loop(iterator, epoch, n)
            images_per_sec, lr = self._record(result, elapsed)
            bar.update(self.step, epoch=f"{epoch + 1}/{cfg.epochs}", loss=result.loss,
                       **{"img/s": f"{images_per_sec:.0f}"}, lr=lr)
            since_save += result.steps
            if in_epoch + n == self.steps_per_epoch:
                self._end_epoch(epoch)
                for hook in self.hooks:
                    hook(self.model, epoch + 1, self.step, self.writer, self.log, self.chief)
                self._save()
                since_save = 0
            elif since_save >= cfg.checkpoint_every:
                self._save()
                since_save = 0

    def _save(self) -> None:
        """A checkpoint at this step, unless this process restored or saved one there (all
        workers call it together; not the manager's latest, which may be a damaged one)."""
        if self._saved_step != self.step:
            self.manager.save(checkpoint_number=self.step)
            self._saved_step = self.step

    def _record(self, result: LoopResult, elapsed: float) -> tuple[float, float]:
        """Write the loop's summaries; returns (images/s, learning rate)."""
        images_per_sec = result.steps * self.config.batch_size / max(elapsed, 1e-9)
        lr = float(self.schedule(self.optimizer.iterations))
        with self.writer.as_default(step=self.step):
            tf.summary.scalar("loss", result.loss)
            tf.summary.scalar("lr", lr)
            tf.summary.scalar("images_per_sec", images_per_sec)
            for name, value in result.stats.items():
                tf.summary.scalar(name, value)
        return images_per_sec, lr

    def _loop(self, iterator, epoch: int, num_steps: int) -> tuple[LoopResult, float]:
        """One call of the step loop: (its result, seconds). Stops the run on a NaN/Inf loss
        or when the data runs out."""
        step, t0 = self.step, time.perf_counter()
        try:
            result = self.run_steps(iterator, num_steps, self._reassign(epoch))
        except tf.errors.OutOfRangeError:
            self._note_failures()
            raise DataError(f"the images of {self.source.name} ran out at step {step}: too many "
                            f"can no longer be read (see {records.SKIPPED} in "
                            f"{self.config.model_dir})") from None
        except tf.errors.OpError as error:  # a peer lost mid-collective: one line
            cluster.raise_if_lost(error, self.strategy, step, self.config.model_dir)
            raise
        elapsed = time.perf_counter() - t0
        self._note_failures()
        if result.bad_step >= 0:
            raise NonFiniteLoss(
                f"loss is not finite at step {result.bad_step} (epoch {epoch + 1}); stopped "
                f"without saving: the last good checkpoint is "
                f"{self.manager.latest_checkpoint or 'none'}")
        self.last_loss.assign(result.loss)
        return result, elapsed

    def describe(self) -> str:
        """One line: method, data, network, precision, XLA, replicas, steps, where it starts."""
        cfg = self.config
        compute = "" if cfg.mixed_precision == "none" else f", {cfg.mixed_precision}"
        compute += ", XLA" if self.compiled else ""
        return (f"{cfg.method} on {self.source.name} ({self.source.num_examples} images) with "
                f"{cfg.model}{compute}, {self.strategy.num_replicas_in_sync} replica(s), "
                f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs; {self.restored_from}")

    def _summary(self) -> dict:
        return {"steps": self.step, "epochs": int(self.epoch.numpy()),
                "last_loss": float(self.last_loss.numpy())}

    def close(self) -> None:
        """Close the summaries, remove a non-chief's checkpoint copy, restore SIGTERM."""
        self.writer.close()
        cluster.remove_checkpoint_dir(self._checkpoint_dir, self.config.model_dir)
        self.preemption.close()
