"""VOC 2007 classification transfer: network, loss, solver, crops, resume, errors."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags
from absl import logging as absl_logging

from data import voc as voc_data
from evaluation.voc import classification as vc
from evaluation.voc import classification_lib as vc_lib
from evaluation.voc import fc_init
from evaluation.voc import metrics as voc_metrics
from losses import loss_scale
from runtime import cli
from runtime.errors import InvalidInput, MissingInput
from runtime.ownership import RunMismatch
from tests.helpers import as_dataset_fn, make_example, make_run_dir, run_module

SIZE = 67  # the smallest crop AlexNet takes (pool5 1 x 1): keeps the runs short on CPU


def _save_pretraining(directory, preprocessing="rgb", model="alexnet") -> str:
    """A pretraining run folder of `model` (AlexNet at SIZE pixels with `preprocessing`)."""
    kwargs = {}
    if model == "alexnet":
        kwargs = {"input_shape": (SIZE, SIZE, 3), "preprocessing": preprocessing,
                  "head": "nat", "feature_dim": 16}
    return make_run_dir(directory, model, config={"method": "nat", "dataset": "test"},
                        **kwargs)[0]


def test_defaults_are_the_reference_protocol():
    c = vc.VocClassificationConfig(model_dir="x")
    assert (c.crop_size, c.batch_size, c.momentum, c.weight_decay, c.clip_norm) == (
        227, 16, 0.9, 1e-6, 10.0)
    assert (c.learning_rate, c.lr_decay, c.lr_decay_steps, c.num_steps) == (
        1e-3, 0.5, 10000, 80000)
    assert (c.test_crops, c.train_layers) == (10, "fc6-8")
    schedule = keras.optimizers.schedules.ExponentialDecay(
        c.learning_rate, c.lr_decay_steps, c.lr_decay, staircase=True)
    lrs = [float(schedule(s)) for s in (0, 9999, 10000, 29999, 79999)]
    np.testing.assert_allclose(lrs, [1e-3, 1e-3, 5e-4, 2.5e-4, 1e-3 / 128], rtol=1e-6)


def test_config_validation_one_line():
    for bad, pattern in [({"train_layers": "conv5"}, "train_layers='conv5'"),
                         ({"fc_init": "zeros"}, "fc_init='zeros'"),
                         ({"min_scale": 0.9, "max_scale": 0.5}, "min_scale"),
                         ({"crop_size": 32}, "crop_size=32"),
                         ({"test_crops": 0}, "test_crops=0"),
                         ({"mixed_precision": "fp8"}, "--mixed_precision=fp8")]:
        with pytest.raises(ValueError, match=pattern) as caught:
            dataclasses.replace(vc.VocClassificationConfig(model_dir="x"), **bad).validate()
        assert "\n" not in str(caught.value)


def test_masked_sigmoid_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 20)) * 3
    labels = rng.choice([-1, 0, 1], size=(3, 20))
    y = (labels > 0).astype(np.float64)
    per_class = np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits)))
    expected = np.sum(per_class * (labels != 0), axis=1)
    got = vc_lib.masked_sigmoid_loss(tf.constant(logits, tf.float32), tf.constant(labels))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    # A difficult label contributes nothing, whatever its logit.
    flipped = logits.copy()
    flipped[labels == 0] *= -100
    np.testing.assert_allclose(
        vc_lib.masked_sigmoid_loss(tf.constant(flipped, tf.float32), tf.constant(labels)).numpy(),
        expected, rtol=1e-5)


def test_train_layers_select_the_right_variables():
    expected = {
        "fc8": {"fc8"},
        "fc6-8": {"fc6", "fc6_bn", "fc7", "fc7_bn", "fc8"},
        "all": {"conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"}
        | {f"{n}_bn" for n in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")},
    }
    for setting, layers in expected.items():
        net = vc_lib.build_classifier(SIZE, "sobel")
        variables = vc_lib.set_trainable(net, setting)
        assert {v.path.split("/")[0] for v in variables} == layers
        assert not any(v.path.startswith("sobel/") for v in variables)
    assert net.output["logits"].dtype == "float32"
    assert net.output["logits"].shape == (None, 20)


def test_random_crop_geometry():
    image = tf.constant(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3)), tf.uint8)
    flips = set()
    for s in range(8):
        # Full-size square crop at the input size: the image itself or its mirror.
        crop = vc_lib.random_crop(image, tf.constant([s, 3]), SIZE, 1.0, 1.0, 0.5).numpy()
        plain = image.numpy() * 0.5
        if np.allclose(crop, plain, atol=1e-4):
            flips.add(False)
        else:
            np.testing.assert_allclose(crop, plain[:, ::-1], atol=1e-4)
            flips.add(True)
    assert flips == {False, True}
    wide = tf.zeros([40, 100, 3], tf.uint8)
    assert vc_lib.random_crop(wide, tf.constant([0, 0]), 80, 0.5, 1.0, 1.0).shape == (80, 80, 3)


@pytest.mark.parametrize("mixed_precision", ["none", "fp16"])
def test_train_step_is_clipped_momentum_sgd_with_weight_decay(mixed_precision):
    """Two steps of fc8-only training against the update written out by hand. Under fp16 loss
    scaling the clipping and the decay see the true gradients: the same update."""
    config = vc.VocClassificationConfig(model_dir="x", crop_size=SIZE, train_layers="fc8",
                                        dropout=0.0, learning_rate=0.1, weight_decay=0.5,
                                        clip_norm=0.05, momentum=0.9,
                                        mixed_precision=mixed_precision)
    keras.utils.set_random_seed(0)
    net = vc_lib.build_classifier(SIZE, "rgb", dropout=0.0)
    variables = vc_lib.set_trainable(net, "fc8")
    optimizer = loss_scale.loss_scaled(
        keras.optimizers.SGD(config.learning_rate, momentum=config.momentum), mixed_precision)
    optimizer.build(variables)
    step = vc_lib.make_train_step(net, optimizer, variables, config)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(size=(2, SIZE, SIZE, 3)), tf.float32)
    labels = tf.constant(rng.choice([-1, 0, 1], size=(2, 20)), tf.int32)

    kernel, bias = (v.numpy().astype(np.float64) for v in variables)
    velocity = [np.zeros_like(kernel), np.zeros_like(bias)]
    for _ in range(2):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(vc_lib.masked_sigmoid_loss(net(images)["logits"], labels))
        grads = [g.numpy().astype(np.float64) for g in tape.gradient(loss, variables)]
        norm = np.sqrt(sum(np.sum(g * g) for g in grads))
        assert norm > config.clip_norm  # so that clipping is exercised
        grads = [g * config.clip_norm / norm for g in grads]
        grads[0] = grads[0] + config.weight_decay * kernel  # decay on the kernel only
        velocity = [config.momentum * v - config.learning_rate * g
                    for v, g in zip(velocity, grads, strict=True)]
        kernel, bias = kernel + velocity[0], bias + velocity[1]
        step(images, labels)
        np.testing.assert_allclose(variables[0].numpy(), kernel, atol=1e-6)
        np.testing.assert_allclose(variables[1].numpy(), bias, atol=1e-6)


def test_kmeans_dense_init():
    rng = np.random.default_rng(0)
    centres = np.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    x = np.concatenate([c + 0.1 * rng.normal(size=(20, 3)) for c in centres])
    found = fc_init.kmeans(x, 3, rng)
    assert sorted(np.argmax(found, axis=1).tolist()) == [0, 1, 2]
    np.testing.assert_allclose(np.sort(found.max(axis=1)), [5, 5, 5], atol=0.1)
    kernel, mean, var = fc_init.kmeans_dense_init(x, 5, rng)  # 5 units: 3 centroids + 2 random
    assert kernel.shape == (3, 5)
    out = x @ kernel.astype(np.float64)
    np.testing.assert_allclose(out.std(axis=0), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out.mean(axis=0), mean, atol=1e-4)
    np.testing.assert_allclose(var, 1.0, rtol=1e-5)


def test_apply_kmeans_init_whitens_fc_outputs():
    # After the data-dependent init, on the crops it saw: every fc8 logit has mean 0 and
    # variance 1, and fc6's BN statistics are those of fc6's pre-activations.
    keras.utils.set_random_seed(0)
    net = vc_lib.build_classifier(SIZE, "rgb")
    images = np.random.default_rng(3).uniform(size=(24, SIZE, SIZE, 3)).astype(np.float32)
    fc_init.apply_kmeans_init(net, images, seed=0)
    logits = net.predict(images, verbose=0)["logits"].astype(np.float64)
    np.testing.assert_allclose(logits.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(logits.std(axis=0), 1.0, rtol=1e-3)
    pool5 = net.predict(images, verbose=0)["pool5"].reshape(24, -1).astype(np.float64)
    pre = pool5 @ net.get_layer("fc6").kernel.numpy().astype(np.float64)
    np.testing.assert_allclose(net.get_layer("fc6_bn").moving_mean.numpy(), pre.mean(axis=0),
                               atol=1e-3)
    np.testing.assert_allclose(pre.std(axis=0), 1.0, rtol=1e-3)


def test_evaluate_sums_logits_over_crops():
    # A model whose logits ignore mirroring (global mean then a fixed dense layer): every
    # full-size crop has the same logits, so the score of an image is test_crops * logits.
    inputs = keras.Input((SIZE, SIZE, 3))
    dense = keras.layers.Dense(20, name="fc8")
    net = keras.Model(inputs, {"logits": dense(keras.layers.GlobalAveragePooling2D()(inputs))})
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (12, SIZE, SIZE, 3)).astype(np.uint8)
    labels = rng.choice([-1, 0, 1], size=(12, 20)).astype(np.int32)
    labels[0] = 1
    examples = tf.data.Dataset.from_tensor_slices(
        {"image": images, "labels": labels, "image_id": [str(i) for i in range(12)]})
    config = vc.VocClassificationConfig(model_dir="x", crop_size=SIZE, min_scale=1.0,
                                        max_scale=1.0, test_crops=3, test_batch_images=5,
                                        pixel_scale=1.0)
    results = vc_lib.evaluate(net, examples, config)
    scores = 3 * net(images.astype(np.float32))["logits"].numpy()
    for i, name in enumerate(voc_data.VOC_CLASSES):
        assert results["per_class"][name]["voc07_ap"] == pytest.approx(
            voc_metrics.classification_ap(scores[:, i], labels[:, i]), abs=1e-9)
    assert results["num_images"] == 12
    assert results["voc07_map"] == pytest.approx(np.mean(
        [voc_metrics.classification_ap(scores[:, i], labels[:, i]) for i in range(20)]))


def test_incompatible_checkpoints(tmp_path):
    base = vc.VocClassificationConfig(model_dir=str(tmp_path / "out"), crop_size=SIZE,
                                      data_dir=str(tmp_path / "no_data"))
    nin = _save_pretraining(tmp_path / "nin", model="nin_cifar10")
    with pytest.raises(ValueError, match="'nin_cifar10' run, not an AlexNet"):
        vc_lib.run(dataclasses.replace(base, pretrained=nin))
    os.remove(os.path.join(nin, "config.json"))  # without its config, the weights tell
    with pytest.raises(InvalidInput, match=r"holds no weights|no weights for conv1"):
        vc_lib.run(dataclasses.replace(base, pretrained=nin))
    sobel = _save_pretraining(tmp_path / "sobel", preprocessing="sobel")
    with pytest.raises(InvalidInput, match=r"conv1.kernel has shape \(11, 11, 2, 96\)") as caught:
        vc_lib.run(dataclasses.replace(base, pretrained=sobel, preprocessing="rgb"))
    assert "\n" not in str(caught.value)
    with pytest.raises(MissingInput, match="nothing does not exist: give a run folder"):
        vc_lib.run(dataclasses.replace(base, pretrained=str(tmp_path / "nothing")))


def _parse(argv: list[str]) -> vc.VocClassificationConfig:
    """Parse argv with the binary's flags, in a FlagValues of its own."""
    flag_values = flags.FlagValues()
    cli.define_flags(vc.VocClassificationConfig, flag_values, vc.PROGRAM)
    flag_values(["voc_classification", *argv])
    return cli.config_from_flags(vc.VocClassificationConfig, flag_values)


def test_flags_parse_into_the_config(tmp_path):
    config = _parse([f"--model_dir={tmp_path}", "--train_layers=all", "--fc_init=kmeans"])
    assert config == vc.VocClassificationConfig(model_dir=str(tmp_path), train_layers="all",
                                                fc_init="kmeans")
    with pytest.raises(ValueError, match=r"train_layers='conv5': choose one of fc8, fc6-8"):
        _parse([f"--model_dir={tmp_path}", "--train_layers=conv5"]).validate()


def test_bad_checkpoint_and_missing_data_exit_with_one_line(tmp_path, capsys):
    sobel = _save_pretraining(tmp_path / "sobel", preprocessing="sobel")
    cases = [
        (_parse([f"--model_dir={tmp_path / 'a'}", f"--pretrained={sobel}",
                 "--preprocessing=rgb", f"--crop_size={SIZE}"]), "is not compatible"),
        (_parse([f"--model_dir={tmp_path / 'b'}", f"--crop_size={SIZE}",
                 f"--data_dir={tmp_path / 'empty'}"]),
         f"`tfds build voc/2007 --data_dir={tmp_path / 'empty'}`"),
    ]
    for config, expected in cases:
        with pytest.raises(SystemExit) as caught:
            cli.run_or_fail(vc.PROGRAM, "evaluation.voc.classification_lib:run", config)
        assert caught.value.code == 1
        message = capsys.readouterr().err
        assert message.startswith("evaluation.voc.classification: error: ")
        assert expected in message and message.count("\n") == 1


@pytest.mark.slow
def test_binary_exits_with_one_line(tmp_path):
    """The real entry point: missing data is one stderr line, no traceback, no start-up log."""
    empty = tmp_path / "empty"
    proc = run_module("evaluation.voc.classification", f"--model_dir={tmp_path}",
                      f"--crop_size={SIZE}", f"--data_dir={empty}", timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"evaluation.voc.classification: error: PASCAL VOC 2007 (voc/2007) is not prepared in "
        f"{empty}: run `tfds build voc/2007 --data_dir={empty}` first"]
    missing = run_module("evaluation.voc.classification", timeout=60)
    assert missing.stderr == ("evaluation.voc.classification: error: --model_dir is required "
                              "(see --help)\n")


# --- a short run on tiny learnable data --------------------------------------------------

# 20 colours, one per class: an object is a flat rectangle of its class colour on grey noise.
PALETTE = [c for c in itertools.product((0, 128, 255), repeat=3) if len(set(c)) > 1][:20]


def _coloured_boxes(n: int, seed: int, size: int = 72) -> list[dict]:
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        image = rng.integers(100, 156, (size, size, 3)).astype(np.uint8)
        classes = [i % 20] + ([int(rng.integers(20))] if rng.random() < 0.3 else [])
        objects = []
        for c in classes:
            w, h = rng.integers(40, 56, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            image[y:y + h, x:x + w] = PALETTE[c]
            objects.append((voc_data.VOC_CLASSES[c], (x + 1, y + 1, x + w, y + h),
                            bool(rng.random() < 0.1)))
        examples.append(make_example(f"{seed}{i:05d}.jpg", image, objects))
    return examples


def _chance_map(labels: np.ndarray, rng: np.random.Generator, draws: int = 200) -> float:
    """The expected devkit mAP of random scores on these labels (Monte Carlo)."""
    present = [i for i in range(20) if np.any(labels[:, i] > 0)]
    return float(np.mean([voc_metrics.classification_ap(rng.random(len(labels)), labels[:, i])
                          for i in present for _ in range(draws)]))


@pytest.mark.slow
def test_short_run_learns_and_resumes(tmp_path, caplog):
    splits = {"train+validation": _coloured_boxes(48, seed=1),
              "test": _coloured_boxes(40, seed=2)}
    test_labels = np.stack([voc_data.classification_labels(e["labels"],
                                                           e["labels_no_difficult"])
                            for e in splits["test"]])
    chance = _chance_map(test_labels, np.random.default_rng(0))
    pretrained = _save_pretraining(tmp_path / "pretrain", preprocessing="rgb")
    config = vc.VocClassificationConfig(
        model_dir=str(tmp_path / "voc"), pretrained=pretrained, train_layers="fc6-8",
        crop_size=SIZE, min_scale=0.8, learning_rate=0.02, num_steps=15, test_crops=2,
        checkpoint_every=15, log_every=15, data_dir=str(tmp_path / "unused"))
    caplog.set_level(logging.INFO)
    # Another test of the session may have lowered absl's verbosity; the resume message is INFO.
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)
    try:
        with tfds.testing.mock_data(as_dataset_fn=as_dataset_fn(splits)):
            first = vc_lib.run(config)
            second = vc_lib.run(dataclasses.replace(config, num_steps=30))
    finally:
        absl_logging.set_verbosity(verbosity)
    print(f"chance mAP {chance:.3f}; after 15 steps {first['voc07_map']:.3f}; "
          f"after 30 (resumed) {second['voc07_map']:.3f}")
    assert any("resumed from" in r.getMessage() and "at step 15" in r.getMessage()
               for r in caplog.records)
    assert second["step"] == 30
    assert sorted(f for f in os.listdir(config.model_dir) if f.endswith(".index")) == [
        "ckpt-15.index", "ckpt-30.index"]
    assert second["voc07_map"] > max(0.6, chance + 0.4)
    saved = json.load(open(os.path.join(config.model_dir, "results.json")))
    assert saved["voc07_map"] == pytest.approx(second["voc07_map"])
    assert set(saved["per_class"]) == set(voc_data.VOC_CLASSES)
    markdown = open(os.path.join(config.model_dir, "results.md")).read()
    assert "| **mean** |" in markdown and "sklearn AP (reference code)" in markdown
    written = json.load(open(os.path.join(config.model_dir, "config.json")))
    assert written["train_layers"] == "fc6-8" and written["model_kwargs"]["preprocessing"] == "rgb"
    assert written["num_steps"] == 30  # a resumable setting: the current value
    with pytest.raises(RunMismatch, match=r"holds a run with other settings \(learning_rate: "
                       r"0.02 -> 0.5; train_layers: \"fc6-8\" -> \"all\"\)"):
        vc_lib.run(dataclasses.replace(config, learning_rate=0.5, train_layers="all"))
