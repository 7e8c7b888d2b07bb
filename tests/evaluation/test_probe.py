"""The probe library: pooling, the classifiers, model loading and the protocol's guarantees."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.linear_model import LogisticRegression

from evaluation import datasets, probe
from models import build_model
from models.weights import named_variables

CLASSES = 10


def make_model_dir(path, model="nin_mnist", **kwargs):
    """A training model_dir as pretraining writes it: a checkpoint and config.json."""
    kwargs = kwargs or {"head": "nat", "feature_dim": 16}
    net = build_model(model, **kwargs)
    checkpoint = tf.train.Checkpoint(model=named_variables(net))
    tf.train.CheckpointManager(checkpoint, str(path), max_to_keep=1).save()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model": model, "model_kwargs": kwargs, "method": "sc", "dataset": "digits"},
                  f)
    return net


def identity_model(shape=(4, 4, 1)):
    inputs = keras.Input(shape, name="images")
    return keras.Model(inputs, {"feat": keras.layers.Activation("linear", name="feat")(inputs)},
                       name="identity")


@pytest.fixture
def separable(monkeypatch):
    """Replace the dataset readers by a 10-class set whose 4x4 images are linearly separable
    by construction (class c lights pixel c), and record every read in order."""
    log = []
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", 300), ("test", 200)):
        labels = np.arange(n) % CLASSES
        images = rng.normal(0.0, 0.05, size=(n, 16)).astype(np.float32)
        images[np.arange(n), labels] += 1.0
        data[split] = (images.reshape(n, 4, 4, 1), labels.astype(np.int64))

    def load_labels(dataset, split):
        log.append(("labels", split))
        return data[split][1]

    def load(dataset, split, input_shape, indices=None):
        log.append(("images", split))
        images, labels = data[split]
        if indices is not None:
            images, labels = images[np.unique(indices)], labels[np.unique(indices)]
        return tf.data.Dataset.from_tensor_slices((images, labels))

    fit_classifier = probe.fit_classifier

    def logged_fit(*args, **kwargs):
        log.append(("fit", None))
        return fit_classifier(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_labels", load_labels)
    monkeypatch.setattr(datasets, "load", load)
    monkeypatch.setattr(probe, "fit_classifier", logged_fit)
    return log


def test_adaptive_pool_matches_numpy_bins():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 5, 3)).astype(np.float32)
    rows = [(0, 3), (2, 5), (4, 7)]  # floor(i 7 / 3), ceil((i + 1) 7 / 3)
    cols = [(0, 3), (2, 5)]  # floor(j 5 / 2), ceil((j + 1) 5 / 2)
    for mode, reduce in (("avg", np.mean), ("max", np.max)):
        out = probe.adaptive_pool(tf.constant(x), (3, 2), mode).numpy()
        expected = np.stack([np.stack([reduce(x[:, r0:r1, c0:c1], axis=(1, 2))
                                       for c0, c1 in cols], axis=1) for r0, r1 in rows], axis=1)
        np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert probe.adaptive_pool(tf.constant(x), (7, 5)).numpy() is not None
    np.testing.assert_array_equal(probe.adaptive_pool(tf.constant(x), (7, 5)).numpy(), x)


def test_pooled_size_from_max_dims_or_stated():
    assert probe.pooled_size((13, 13, 256)) == (6, 6)  # 6 * 6 * 256 = 9216
    assert probe.pooled_size((55, 55, 96)) == (9, 9)  # 9 * 9 * 96 = 7776 <= 9216 < 10 * 10 * 96
    assert probe.pooled_size((7, 7, 64)) == (7, 7)  # 3136 dims: no pooling
    assert probe.pooled_size((7, 5, 64), pool_size=2) == (2, 2)
    assert probe.pooled_size((3, 3, 4096), max_dims=100) == (1, 1)


@pytest.mark.parametrize("n, d", [(30, 80), (120, 6)])
def test_logistic_regression_matches_sklearn(n, d):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d))
    y = np.arange(n) % 3
    w, b = probe.logistic_regression(x, y, c=0.5, num_classes=3)
    reference = LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit(x, y)
    scores = x @ w + b
    ref_scores = reference.decision_function(x)
    # logits are defined up to a per-example constant: compare the softmax probabilities
    def softmax(z):
        return np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(
            1, keepdims=True)

    np.testing.assert_allclose(softmax(scores), softmax(ref_scores), atol=2e-4)
    np.testing.assert_allclose(w - w.mean(1, keepdims=True),
                               reference.coef_.T - reference.coef_.T.mean(1, keepdims=True),
                               atol=2e-4)


def test_probe_on_separable_features_reaches_99_percent(separable):
    result = probe.run_probe(identity_model(), ["feat"], "digits", labels_per_class=5, splits=3)
    (feat,) = result.endpoints
    assert feat.dims == 16 and result.test_examples == 200
    assert all(s.fit_examples + s.val_examples == 50 for s in feat.splits)
    assert all(s.val_examples == 10 for s in feat.splits)  # one per class: round(0.2 * 5)
    assert feat.mean >= 0.99


def test_mlp_head_on_separable_features(separable):
    mlp = probe.MLPHead(width=32, epochs=20, batch_size=16, learning_rate=0.05)
    accuracy = probe.probe(identity_model(), "feat", "digits", 10, 2, head="mlp", mlp=mlp)
    assert accuracy >= 0.95


def test_mlp_classifier_is_fc_bn_relu_dropout_twice():
    net = probe.mlp_classifier(12, 5, probe.MLPHead(width=8), seed=0)
    kinds = [type(layer).__name__ for layer in net.layers[1:]]
    assert kinds == ["Dense", "BatchNormalization", "ReLU", "Dropout"] * 2 + ["Dense"]
    assert [tuple(w.shape) for w in net.layers[1].get_weights()] == [(12, 8), (8,)]
    assert net.output.shape[-1] == 5
    assert net.layers[4].rate == 0.5


def test_test_split_is_read_once_after_every_fit(separable):
    probe.run_probe(identity_model(), ["feat", probe.PIXELS], "digits", labels_per_class=4,
                    splits=3)
    test_reads = [i for i, (kind, split) in enumerate(separable) if split == "test"]
    fits = [i for i, (kind, _) in enumerate(separable) if kind == "fit"]
    assert len(fits) == 6  # 3 splits x 2 endpoints
    assert len(test_reads) == 1 and test_reads[0] > max(fits)
    # train images are read once for all splits: features are extracted once
    assert separable.count(("images", "train")) == 1


def test_random_init_probe_runs_end_to_end_on_digits():
    model = build_model("nin_mnist", head="nat", feature_dim=16)
    result = probe.run_probe(model, ["sc", "embedding", probe.PIXELS], "digits",
                             labels_per_class=5, splits=2)
    assert result.test_examples == 599
    assert [e.endpoint for e in result.endpoints] == ["sc", "embedding", "pixels"]
    assert [e.shape for e in result.endpoints] == [(7, 7, 64), (16,), (28, 28, 1)]
    for e in result.endpoints:
        assert len(e.splits) == 2
        assert 0.3 < e.mean <= 1.0  # ten classes: chance is 0.1
    one = probe.probe(model, "sc", "digits", 5, 2)
    assert one == pytest.approx(result.endpoints[0].mean)


def test_frozen_network_does_not_change_during_probing(separable):
    model = build_model("nin_mnist", input_shape=(4, 4, 1), head="nat", feature_dim=8)
    before = [v.numpy().copy() for v in model.variables]
    probe.run_probe(model, ["sc", "embedding"], "digits", labels_per_class=3, splits=2)
    probe.run_probe(model, ["sc"], "digits", labels_per_class=3, splits=1, head="mlp",
                    mlp=probe.MLPHead(width=8, epochs=2))
    for variable, value in zip(model.variables, before, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


def test_pretrained_weights_really_load(tmp_path):
    saved = make_model_dir(tmp_path)
    model, report, config = probe.load_model_dir(str(tmp_path))
    assert config["model"] == "nin_mnist"
    reader = tf.train.load_checkpoint(str(tmp_path))
    keys = named_variables(model)
    assert set(report.loaded) == set(keys) and not report.missing
    fresh = named_variables(build_model("nin_mnist", head="nat", feature_dim=16))
    differs = set()
    for key, variable in keys.items():
        # object-graph keys escape "." as ".." (and "/" as ".S")
        escaped = key.replace(".", "..").replace("/", ".S")
        stored = reader.get_tensor(f"model/{escaped}/.ATTRIBUTES/VARIABLE_VALUE")
        np.testing.assert_array_equal(variable.numpy(), stored, err_msg=key)
        np.testing.assert_array_equal(stored, named_variables(saved)[key].numpy())
        if not np.array_equal(fresh[key].numpy(), stored):
            differs.add(key)
    # a fresh network draws other random kernels; the rest starts at constants
    assert differs == {key for key in keys if key.endswith(".kernel")}
    assert len(differs) == 4


def test_model_dir_without_checkpoint_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        probe.load_model_dir(str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model": "nin_mnist", "model_kwargs": {}}, f)
    with pytest.raises(FileNotFoundError, match="no checkpoint in directory"):
        probe.load_model_dir(str(tmp_path))


def test_unknown_endpoint_and_k_too_large_name_the_choices(separable):
    model = identity_model()
    with pytest.raises(ValueError, match="unknown endpoint 'conv9' of identity; choose from "
                                         "feat, pixels"):
        probe.run_probe(model, ["conv9"], "digits")
    with pytest.raises(datasets.LabelsPerClassError, match="31 labels per class"):
        probe.run_probe(model, ["feat"], "digits", labels_per_class=31)
    assert ("labels", "test") not in separable and ("images", "test") not in separable


def test_saved_model_features_match_the_keras_model(tmp_path):
    model = build_model("nin_mnist", input_shape=(8, 8, 1), head="none")

    class Export(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32)])
        def serve(self, images):
            out = self.model(images, training=False)
            return {"sc": out["sc"], "block1": out["block1"]}

    module = Export()
    path = str(tmp_path / "saved")
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    features = probe.SavedModelFeatures(path)
    assert features.input_shape == (None, 8, 8, 1)
    assert set(probe.endpoint_names(features)) == {"sc", "block1", "pixels"}
    x = np.random.default_rng(0).uniform(size=(3, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(features(x)["sc"].numpy(), model(x)["sc"].numpy(), atol=1e-5)
    ds = tf.data.Dataset.from_tensor_slices((x, np.arange(3)))
    out = probe.extract_features(features, ["sc"], ds, pool_size=1)
    np.testing.assert_allclose(out.values["sc"], model(x)["sc"].numpy().mean(axis=(1, 2)),
                               atol=1e-5)
