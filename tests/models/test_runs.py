"""Rebuilding a run's network (models/runs.py) and its checkpoints (models/checkpoints.py)."""

import numpy as np
import pytest
import tensorflow as tf

from models import build_model
from models.checkpoints import open_checkpoints
from models.runs import backbone_layers, load_run_model
from models.weights import named_variables
from runtime.errors import InvalidInput, MissingInput
from runtime.run_config import read_config, write_config
from tests.helpers import make_run_dir


def test_pretrained_weights_really_load(tmp_path):
    path, saved = make_run_dir(tmp_path / "run", seed=3, config={"method": "sc"},
                               head="nat", feature_dim=16)
    loaded = load_run_model(path)
    assert (loaded.name, loaded.config["method"]) == ("nin_mnist", "sc")
    assert loaded.kwargs == {"head": "nat", "feature_dim": 16}
    keys = named_variables(loaded.model)
    assert loaded.loaded == len(keys) and loaded.checkpoint == tf.train.latest_checkpoint(path)
    reader = tf.train.load_checkpoint(path)
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


def test_overrides_random_init_and_another_head(tmp_path):
    path, _ = make_run_dir(tmp_path / "run", head="nat", feature_dim=8)
    softmax = load_run_model(path, overrides={"head": "softmax", "num_classes": 3})
    assert softmax.model.output["logits"].shape[-1] == 3
    assert softmax.loaded == len(named_variables(build_model("nin_mnist", head="none")))
    random = load_run_model(path, init="random")
    assert random.checkpoint is None and random.loaded == 0
    bare = load_run_model("", "nin_cifar10", init="random")
    assert bare.name == "nin_cifar10" and bare.config == {}


def test_missing_folders_configs_and_checkpoints_are_named(tmp_path):
    with pytest.raises(MissingInput, match=f"run folder {tmp_path / 'no'} does not exist"):
        read_config(str(tmp_path / "no"))
    with pytest.raises(MissingInput, match=r"has no config\.json: not a run folder"):
        load_run_model(str(tmp_path))
    write_config(str(tmp_path), {"model": "nin_mnist", "model_kwargs": {}})
    with pytest.raises(MissingInput, match="no checkpoint in directory"):
        load_run_model(str(tmp_path))
    with pytest.raises(MissingInput, match=f"{tmp_path / 'gone'} does not exist"):
        load_run_model(str(tmp_path), checkpoint=str(tmp_path / "gone"))
    with pytest.raises(InvalidInput, match="no model name"):
        load_run_model("", "", init="random")


def test_open_checkpoints_restores_the_latest(tmp_path):
    step = tf.Variable(0)
    _, manager, latest = open_checkpoints(str(tmp_path), {"step": step}, keep=2)
    assert latest is None
    step.assign(7)
    manager.save(checkpoint_number=7)
    again = tf.Variable(0)
    _, _, latest = open_checkpoints(str(tmp_path), {"step": again}, keep=2)
    assert latest.endswith("ckpt-7") and int(again.numpy()) == 7


def test_backbone_layers_are_the_layers_up_to_the_head():
    layers = backbone_layers("nin_mnist", head="softmax", num_classes=5)
    assert layers[0] == "conv1_1" and "embedding_fc" not in layers and "conv3_1" not in layers
    assert backbone_layers("alexnet", head="nat", feature_dim=8)[-1] == "fc7_bn"
