"""The pretraining learning rate (NAT Sec. 3.3 and SC Sec. 5 combined; train/trainer.py) and
the plateau rule that cuts it.

    lr(t) = lr * scale / (1 + gamma * max(0, t - t0))

`Plateau` owns `scale`: it starts at 1 and is multiplied by `factor` when the epoch's mean loss
has not gone below the best one by `min_delta` for `patience` epochs (0: never cut). Its whole
state is variables that the run's checkpoint holds (`checkpoint_objects`), the epoch's running
loss sum and step count included: a run resumed mid-epoch judges that epoch on all of its
steps, as the uninterrupted run does.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


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


class Plateau:
    """The plateau rule (module docstring). Build it inside the strategy's scope.

    `add(loss)` runs in the training loop, once per step, with the step's global loss; the
    sum is float64 and added step by step, so it does not depend on how the steps are split
    into loops. `end_epoch()` judges the epoch and starts the next one.
    """

    def __init__(self, patience: int, factor: float, min_delta: float):
        self.patience, self.factor, self.min_delta = int(patience), float(factor), min_delta
        self.scale = tf.Variable(1.0, trainable=False, name="lr_scale")
        self.best_loss = tf.Variable(np.inf, trainable=False, dtype=tf.float32,
                                     name="best_loss")
        self.bad_epochs = tf.Variable(0, trainable=False, dtype=tf.int64, name="bad_epochs")
        self.epoch_loss = tf.Variable(0.0, trainable=False, dtype=tf.float64, name="epoch_loss")
        self.epoch_steps = tf.Variable(0, trainable=False, dtype=tf.int64, name="epoch_steps")

    def checkpoint_objects(self) -> dict[str, tf.Variable]:
        """The state, by checkpoint key."""
        return dict(lr_scale=self.scale, best_loss=self.best_loss, bad_epochs=self.bad_epochs,
                    epoch_loss=self.epoch_loss, epoch_steps=self.epoch_steps)

    def add(self, loss: tf.Tensor) -> None:
        """Count one step's loss towards the epoch's mean."""
        self.epoch_loss.assign_add(tf.cast(loss, tf.float64))
        self.epoch_steps.assign_add(1)

    def epoch_mean(self) -> float:
        """The mean loss of the epoch's steps so far."""
        return float(self.epoch_loss.numpy()) / max(int(self.epoch_steps.numpy()), 1)

    def end_epoch(self) -> tuple[float, bool]:
        """Judge the epoch by its mean loss and clear the sums: (the mean, whether the scale
        was cut)."""
        mean, cut = self.epoch_mean(), False
        self.epoch_loss.assign(0.0)
        self.epoch_steps.assign(0)
        if self.patience <= 0:
            return mean, cut
        if mean < float(self.best_loss.numpy()) - self.min_delta:
            self.best_loss.assign(mean)
            self.bad_epochs.assign(0)
            return mean, cut
        self.bad_epochs.assign_add(1)
        if int(self.bad_epochs.numpy()) >= self.patience:
            self.scale.assign(self.scale * self.factor)
            self.bad_epochs.assign(0)
            cut = True
        return mean, cut
