"""What the throughput benchmarks share: the supervised baseline step and a fixed-batch feed.

    step = SupervisedStep(model, input_shape, labels, batch_size, strategy, ...)
    step.run_steps(iterator, steps)      # the same (index, images) batches as the Trainer
    synthetic_source(input_shape, n)     # a PretrainSource for a Trainer fed its own batches
    fixed_batches(strategy, batch, size) # one random batch, repeated, as a distributed iterator

SupervisedStep: the model with its softmax head, or with `nat_shaped` the NAT network's trunk
and kind of head: the global average of `sc` and one Dense layer (NiN models; AlexNet's own
softmax head, a Dense layer on fc7, already has the NAT head's shape), the like-for-like
comparison of NAT Table 1. The loss is the softmax cross-entropy of `labels[index]`, averaged
over the global batch; SGD with momentum, no weight decay. Precision and XLA go through the
library's own helpers (models/precision.py, losses/loss_scale.py, train/compiled.py), as in
the pretraining
Trainer, and the loop is the Trainer's: `strategy.run` inside one tf.function over `steps`
steps.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from data.pretrain import PretrainSource
from losses import loss_scale
from models import build_model, precision
from train.compiled import network_forward


class SupervisedStep:
    """See the module docstring. `labels` holds one class per dataset index."""

    def __init__(self, model: str, input_shape: tuple[int, int, int], labels: np.ndarray,
                 batch_size: int, strategy: tf.distribute.Strategy, nat_shaped: bool = False,
                 num_classes: int = 10, mixed_precision: str = "none", jit_compile: bool = False,
                 log=print):
        self.strategy = strategy
        self.batch = batch_size
        with strategy.scope(), precision.policy_scope(mixed_precision):
            if nat_shaped and model != "alexnet":
                trunk = build_model(model, head="none", input_shape=input_shape)
                pooled = keras.layers.GlobalAveragePooling2D()(trunk.output["sc"])
                logits = keras.layers.Dense(num_classes, dtype="float32")(pooled)
                self.model = keras.Model(trunk.input, {"logits": logits})
            else:
                self.model = build_model(model, head="softmax", input_shape=input_shape,
                                         num_classes=num_classes)
            self.optimizer = loss_scale.loss_scaled(keras.optimizers.SGD(0.01, momentum=0.9),
                                                   mixed_precision)
            self.optimizer.build(self.model.trainable_variables)
        self.forward, self.compiled = network_forward(self.model, strategy, input_shape,
                                                      jit_compile, log)
        self.labels = tf.constant(np.asarray(labels, np.int32))
        self.loop = self._build_loop()

    def _replica_step(self, batch):
        indices, images = batch
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            logits = tf.cast(self.forward(images)["logits"], tf.float32)
            per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
                tf.gather(self.labels, indices), logits)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.batch)
            target = loss_scale.scale_loss(self.optimizer, loss)
        grads = loss_scale.unscaled_gradients(self.optimizer, tape, target, variables)
        loss_scale.apply_gradients(self.optimizer, grads, variables)
        return loss

    def _build_loop(self):
        @tf.function
        def loop(iterator, steps):
            total = tf.constant(0.0)
            for _ in tf.range(steps):
                loss = self.strategy.run(self._replica_step, args=(next(iterator),))
                total += self.strategy.reduce("SUM", loss, axis=None)
            return total

        return loop

    def run_steps(self, iterator, steps: int) -> float:
        """`steps` steps in one tf.function call; returns their mean loss."""
        return float(self.loop(iterator, tf.constant(steps))) / steps


def synthetic_source(input_shape: tuple[int, int, int], num_examples: int) -> PretrainSource:
    """A PretrainSource of `num_examples` blank images, for a Trainer fed its own batches."""

    def elements():
        images = tf.zeros([num_examples, *input_shape])
        return tf.data.Dataset.from_tensor_slices((tf.range(num_examples, dtype=tf.int64),
                                                   images))

    return PretrainSource("synthetic", num_examples, tuple(input_shape), elements,
                          lambda x: x, fixed_size=True)


def fixed_batches(strategy: tf.distribute.Strategy, batch: int, size: int):
    """A distributed iterator repeating one batch: indices 0..batch-1 and random images
    [batch, size, size, 3], so that a step's time excludes the input pipeline."""
    images = tf.random.stateless_uniform([batch, size, size, 3], seed=[0, 1])
    dataset = tf.data.Dataset.from_tensors((tf.range(batch), images)).repeat()
    return iter(strategy.experimental_distribute_dataset(dataset))
