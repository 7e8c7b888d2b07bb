"""build_model, `python -m models`, .keras round trips and the name-keyed checkpoint format."""


import keras
import numpy as np
import pytest
import tensorflow as tf

from models import MODEL_NAMES, TRANSFER_ENDPOINT, build_model
from models.weights import load_weights, named_variables
from runtime.errors import InvalidInput, MissingInput
from tests.helpers import run_module


def test_unknown_model_lists_the_known_names():
    with pytest.raises(InvalidInput, match=r"unknown model 'resnet'.*alexnet.*nin_cifar10"):
        build_model("resnet")


def test_every_model_has_its_transfer_endpoint():
    for name in MODEL_NAMES:
        head = "nat" if name == "alexnet" else "softmax"
        kwargs = {"input_shape": (67, 67, 3), "feature_dim": 8} if name == "alexnet" else {}
        assert TRANSFER_ENDPOINT[name] in build_model(name, head=head, **kwargs).output


@pytest.mark.parametrize("name,kwargs", [
    ("alexnet", {"input_shape": (67, 67, 3), "feature_dim": 16}),
    ("alexnet", {"input_shape": (67, 67, 3), "preprocessing": "highpass", "head": "softmax",
                 "num_classes": 5}),
    ("nin_mnist", {}),
    ("nin_cifar10", {"head": "nat", "feature_dim": 8}),
])
def test_keras_file_round_trip_gives_identical_outputs(tmp_path, name, kwargs):
    model = build_model(name, **kwargs)
    shape = model.input.shape[1:]
    x = np.random.default_rng(0).uniform(0, 1, (3, *shape)).astype(np.float32)
    # Move the BN statistics away from their initial values so the round trip has to keep them.
    model(x, training=True)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    before, after = model(x, training=False), loaded(x, training=False)
    assert set(before) == set(after)
    for key in before:
        np.testing.assert_array_equal(np.asarray(before[key]), np.asarray(after[key]))


def test_named_checkpoint_moves_weights_between_heads(tmp_path):
    nat = build_model("nin_mnist", head="nat", feature_dim=8)
    prefix = tf.train.Checkpoint(model=named_variables(nat)).write(str(tmp_path / "ckpt"))
    softmax = build_model("nin_mnist")
    report = load_weights(softmax, prefix, require=("conv1_1", "conv2_2"))
    shared = {w.path for w in build_model("nin_mnist", head="none").weights}
    assert {k.replace(".", "/") for k in report.loaded} == shared
    nat_by_path = {w.path: w for w in nat.weights}
    for w in softmax.weights:
        if w.path in shared:
            np.testing.assert_array_equal(np.asarray(w), np.asarray(nat_by_path[w.path]))
    assert all(k.startswith(("conv3_", "logits")) for k in report.missing)


def test_load_weights_errors_name_the_checkpoint(tmp_path):
    with pytest.raises(MissingInput, match="no checkpoint in directory"):
        load_weights(build_model("nin_mnist"), str(tmp_path))
    prefix = tf.train.Checkpoint(model=named_variables(build_model("nin_mnist"))).write(
        str(tmp_path / "mnist"))
    with pytest.raises(InvalidInput, match="not compatible with nin_cifar10"):
        load_weights(build_model("nin_cifar10"), prefix)
    with pytest.raises(InvalidInput, match="no weights for conv5"):
        load_weights(build_model("nin_mnist"), prefix, require=("conv5",))


@pytest.mark.slow
def test_python_m_models_prints_the_table():
    done = run_module("models", timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    out = done.stdout
    assert out.splitlines()[0].split() == ["model", "input", "trainable", "frozen", "endpoint",
                                           "shape"]
    assert "alexnet (nat)" in out and "66,669,952" in out and "pool5      6x6x256" in out
    assert "nin_mnist (softmax)" in out and "131,860" in out
