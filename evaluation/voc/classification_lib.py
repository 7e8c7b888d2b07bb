"""`run` of `python -m evaluation.voc.classification`, whose docstring states the protocol."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from data import voc as voc_data
from evaluation.voc import common, fc_init
from evaluation.voc import metrics as voc_metrics
from evaluation.voc.classification import TRAIN_LAYERS, VocClassificationConfig
from losses import loss_scale
from models import build_model
from models.weights import load_weights
from runtime.errors import InvalidInput
from runtime.progress import Progress

BACKBONE_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")


# --- the network ------------------------------------------------------------------------


def build_classifier(crop_size: int = 227, preprocessing: str = "sobel",
                     dropout: float = 0.5) -> keras.Model:
    """AlexNet (head "none") plus dropout and a new 20-way fc8.

    Returns a keras.Model: float images [N, crop_size, crop_size, 3] -> the AlexNet endpoints
    (conv1..conv5, pool5, fc6, fc7) plus "logits" [N, 20] float32 = fc8(dropout(fc7)). The
    layers are those of `models.alexnet`, so pretraining checkpoints load by name.
    """
    backbone = build_model("alexnet", input_shape=(crop_size, crop_size, 3),
                           preprocessing=preprocessing, head="none", dropout=dropout)
    endpoints = dict(backbone.output)
    # With head "none" the backbone graph ends at fc7, before its dropout.
    x = keras.layers.Dropout(dropout, name="fc7_dropout")(endpoints["fc7"])
    endpoints["logits"] = keras.layers.Dense(
        voc_data.NUM_CLASSES, name="fc8", dtype="float32",
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
        bias_initializer="zeros")(x)
    return keras.Model(backbone.input, endpoints, name="alexnet_voc")


def set_trainable(net: keras.Model, train_layers: str) -> list[keras.Variable]:
    """Freeze every layer outside `TRAIN_LAYERS[train_layers]`; return the trained variables."""
    chosen = TRAIN_LAYERS[train_layers]
    for layer in net.layers:
        if isinstance(layer, keras.layers.InputLayer) or not layer.weights:
            continue
        # The fixed preprocessing front has no trainable weight and stays so.
        if chosen and layer.name not in chosen:
            layer.trainable = False
    return list(net.trainable_variables)


# --- data -------------------------------------------------------------------------------


def random_crop(image: tf.Tensor, seed: tf.Tensor, crop_size: int, min_scale: float,
                max_scale: float, pixel_scale: float) -> tf.Tensor:
    """One training crop: uint8 [H, W, 3] -> float32 [crop_size, crop_size, 3].

    A square of side floor(s * min(H, W)), s ~ U[min_scale, max_scale], at a uniform random
    position, resized bilinearly, mirrored with probability 1/2, times pixel_scale. `seed` is
    a stateless seed [2] int32.
    """
    seeds = tf.random.experimental.stateless_split(seed, 4)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    scale = tf.random.stateless_uniform([], seeds[0], min_scale, max_scale)
    side = tf.cast(scale * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
    side = tf.clip_by_value(side, 1, tf.minimum(height, width))
    top = tf.random.stateless_uniform([], seeds[1], 0, height - side + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[2], 0, width - side + 1, dtype=tf.int32)
    crop = image[top:top + side, left:left + side]
    crop = tf.image.resize(tf.cast(crop, tf.float32), (crop_size, crop_size), "bilinear")
    flip = tf.random.stateless_uniform([], seeds[3]) < 0.5
    crop = tf.cond(flip, lambda: tf.reverse(crop, axis=[1]), lambda: crop)
    return crop * pixel_scale


def training_dataset(examples: tf.data.Dataset, config: VocClassificationConfig,
                     start_step: int = 0) -> tf.data.Dataset:
    """(images [B, S, S, 3] float32, labels [B, 20] int32) batches, endlessly.

    Shuffled per epoch; each crop draws from a stateless seed (seed, start_step, k) for the
    k-th element, so a run (and a resumed run) is reproducible.
    """
    def crop(index, example):
        seed = tf.stack([tf.cast(config.seed, tf.int64) * 1_000_003 + start_step, index])
        image = random_crop(example["image"], tf.cast(seed, tf.int32), config.crop_size,
                            config.min_scale, config.max_scale, config.pixel_scale)
        return image, example["labels"]

    dataset = examples.shuffle(1024, seed=config.seed + start_step,
                               reshuffle_each_iteration=True).repeat().enumerate()
    dataset = dataset.map(crop, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(config.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def test_dataset(examples: tf.data.Dataset, config: VocClassificationConfig) -> tf.data.Dataset:
    """(crops [B, test_crops, S, S, 3], labels [B, 20], image_id [B]) batches, in file order."""
    def crops(index, example):
        base = tf.cast(tf.stack([config.seed + 7919, index]), tf.int32)
        seeds = tf.random.experimental.stateless_split(base, config.test_crops)
        images = tf.map_fn(
            lambda s: random_crop(example["image"], s, config.crop_size, config.min_scale,
                                  config.max_scale, config.pixel_scale),
            seeds, fn_output_signature=tf.float32)
        return images, example["labels"], example["image_id"]

    dataset = examples.enumerate().map(crops, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(config.test_batch_images).prefetch(tf.data.AUTOTUNE)


# --- loss and data-dependent init -------------------------------------------------------


def masked_sigmoid_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Per-example loss [B]: sum over classes with label != 0 of the sigmoid cross-entropy.

    Args:
      logits: [B, 20] float.
      labels: [B, 20] int, 1 / -1 / 0 (0: difficult only, ignored).
    """
    logits = tf.cast(logits, tf.float32)
    targets = tf.cast(labels > 0, tf.float32)
    mask = tf.cast(tf.not_equal(labels, 0), tf.float32)
    per_class = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits)
    return tf.reduce_sum(per_class * mask, axis=1)


# --- training and evaluation ------------------------------------------------------------


def make_train_step(net: keras.Model, optimizer: keras.optimizers.Optimizer,
                    variables: list[keras.Variable], config: VocClassificationConfig
                    ) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """A tf.function (images, labels) -> mean loss, applying one SGD step."""
    decay = [config.weight_decay if "kernel" in v.path else 0.0 for v in variables]

    @tf.function(reduce_retracing=True)
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = net(images, training=True)["logits"]
            loss = tf.reduce_mean(masked_sigmoid_loss(logits, labels))
            target = loss_scale.scale_loss(optimizer, loss)
        grads = loss_scale.unscaled_gradients(optimizer, tape, target, variables)
        grads, _ = tf.clip_by_global_norm(grads, config.clip_norm)
        grads = [g + d * v.value if d else g for g, d, v in zip(grads, decay, variables,
                                                                  strict=True)]
        loss_scale.apply_gradients(optimizer, grads, variables)
        return loss

    return step


def evaluate(net: keras.Model, examples: tf.data.Dataset, config: VocClassificationConfig
             ) -> dict:
    """Scores of the test images (logits summed over random crops) and their APs.

    Returns {"voc07_map", "sklearn_map", "per_class": {class: {"voc07_ap", "sklearn_ap"}},
    "num_images"}; a class without any positive test image gets NaN and is left out of
    the means.
    """
    @tf.function(reduce_retracing=True)
    def scores_of(crops):
        shape = tf.shape(crops)
        flat = tf.reshape(crops, tf.concat([[-1], shape[2:]], axis=0))
        logits = net(flat, training=False)["logits"]
        return tf.reduce_sum(tf.reshape(logits, [shape[0], shape[1], -1]), axis=1)

    scores, labels = [], []
    bar = Progress(voc_data.NUM_IMAGES["test"], "testing", unit=" images", delay=5.0)
    for crops, batch_labels, _ in test_dataset(examples, config):
        scores.append(scores_of(crops).numpy())
        labels.append(batch_labels.numpy())
        bar.update(sum(map(len, labels)))
    bar.close()
    if not scores:
        raise InvalidInput("the test split is empty")
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    per_class = {}
    for index, name in enumerate(voc_data.VOC_CLASSES):
        if np.any(labels[:, index] > 0):
            per_class[name] = {
                "voc07_ap": voc_metrics.classification_ap(scores[:, index], labels[:, index]),
                "sklearn_ap": voc_metrics.sklearn_ap(scores[:, index], labels[:, index]),
            }
        else:
            per_class[name] = {"voc07_ap": float("nan"), "sklearn_ap": float("nan")}
    present = {c: v for c, v in per_class.items() if not np.isnan(v["voc07_ap"])}
    return {
        "voc07_map": voc_metrics.mean_ap({c: v["voc07_ap"] for c, v in present.items()}),
        "sklearn_map": voc_metrics.mean_ap({c: v["sklearn_ap"] for c, v in present.items()}),
        "per_class": per_class,
        "num_images": len(labels),
    }


def results_table(results: dict) -> str:
    """The markdown table of the per-class APs (percent) and their means."""
    present = {c: v for c, v in results["per_class"].items() if not np.isnan(v["voc07_ap"])}
    return voc_metrics.format_ap_table({
        "VOC07 11-point AP": {c: v["voc07_ap"] for c, v in present.items()},
        "sklearn AP (reference code)": {c: v["sklearn_ap"] for c, v in present.items()},
    })


def _kmeans_batch(examples, config: VocClassificationConfig) -> np.ndarray:
    crops = training_dataset(examples, dataclasses.replace(config, batch_size=1), start_step=-1)
    images = [image[0] for image, _ in crops.take(config.kmeans_images).as_numpy_iterator()]
    return np.stack(images)


class ClassificationProtocol:
    """VOC 2007 classification for `evaluation.voc.common.run`."""

    title = "VOC 2007 classification"

    def __init__(self):
        self.train_examples = self.test_examples = None

    def build(self, config: VocClassificationConfig, preprocessing: str):
        net = build_classifier(config.crop_size, preprocessing, config.dropout)
        schedule = keras.optimizers.schedules.ExponentialDecay(
            config.learning_rate, config.lr_decay_steps, config.lr_decay, staircase=True)
        return net, schedule, set_trainable(net, config.train_layers)

    def model_kwargs(self, preprocessing: str) -> dict:
        return {"preprocessing": preprocessing, "head": "none"}

    def initialize(self, net, config: VocClassificationConfig) -> None:
        # fc6/fc7 come from the checkpoint only with fc_init=checkpoint; otherwise only the
        # convolutional part (up to pool5) is read, so a pretraining run at another input
        # size still loads.
        target = net if config.fc_init == "checkpoint" else keras.Model(
            net.input, net.get_layer("pool5").output, name=net.name)
        report = load_weights(target, config.pretrained, require=BACKBONE_LAYERS)
        logging.info("loaded %d weights from %s", len(report.loaded), report.checkpoint)

    def prepare(self, net, config: VocClassificationConfig, resumed: bool) -> None:
        if not resumed and config.fc_init == "gaussian":
            fc_init.reinit_fc(net, config.seed)
        self.train_examples = voc_data.load_classification("trainval", shuffle_files=True,
                                                           **config.data_args)
        self.test_examples = voc_data.load_classification("test", **config.data_args)
        if not resumed and config.fc_init == "kmeans":
            fc_init.apply_kmeans_init(net, _kmeans_batch(self.train_examples, config), config.seed)

    def train_step(self, net, optimizer, variables, config) -> Callable:
        step = make_train_step(net, optimizer, variables, config)
        return lambda batch: {"loss": step(*batch)}

    def batches(self, config, start_step: int):
        return iter(training_dataset(self.train_examples, config, start_step=start_step))

    def evaluate(self, net, config) -> dict:
        results = evaluate(net, self.test_examples, config)
        results["train_layers"] = config.train_layers
        return results

    def report(self, results: dict, config) -> tuple[str, str]:
        summary = (f"VOC07 11-point mAP: {100 * results['voc07_map']:.1f}  (sklearn AP of the "
                   f"reference code: {100 * results['sklearn_map']:.1f}) on "
                   f"{results['num_images']} test images, train_layers={config.train_layers}")
        return results_table(results), summary


def run(config: VocClassificationConfig) -> dict:
    """Train and evaluate as the module docstring says; returns the results dict."""
    return common.run(ClassificationProtocol(), config)
