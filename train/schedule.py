"""The pretraining learning rate (NAT Sec. 3.3 and SC Sec. 5 combined; train/trainer.py)."""

from __future__ import annotations

import keras
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
