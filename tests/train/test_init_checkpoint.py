"""`--pretrained`: a pretraining run starts from another run's backbone, and only that."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from models import build_model
from models.runs import load_backbone, transfer_layers
from models.weights import named_variables
from runtime.errors import InvalidInput
from tests.helpers import make_run_dir
from train.config import TrainConfig
from train.trainer import Trainer

NIN_BACKBONE = ("conv1_1", "pool1_2_bn", "conv2_1", "conv2_1_bn", "conv2_2", "conv2_2_bn",
                "pool2_3_bn")


def test_transfer_layers_stop_at_the_transfer_endpoint():
    assert transfer_layers(build_model("nin_mnist", head="nat", feature_dim=8),
                           "nin_mnist") == NIN_BACKBONE
    alexnet = build_model("alexnet", head="nat", feature_dim=8, input_shape=(64, 64, 3))
    layers = transfer_layers(alexnet, "alexnet")
    assert layers[0] == "sobel" and layers[-1] == "conv5_bn"  # not fc6, fc7, the embedding
    assert {"conv1", "conv5", "conv5_bn"} <= set(layers) and "fc6" not in layers


def test_a_nat_run_starts_from_a_nat_run_of_another_dimension(tmp_path):
    donor_dir, donor = make_run_dir(tmp_path / "donor", seed=7, head="nat", feature_dim=32)
    config = TrainConfig(model_dir=str(tmp_path / "run"), nat_dim=16, batch_size=128,
                         epochs=1, pretrained=donor_dir)
    # restored_from ends the line trainer.train() logs at its start
    trainer = Trainer(config, tf.distribute.get_strategy(), log=lambda _: None)
    keras.utils.set_random_seed(config.seed)
    fresh = named_variables(build_model("nin_mnist", **config.model_kwargs()))
    donor_vars = named_variables(donor)
    for key, variable in named_variables(trainer.model).items():
        expected = donor_vars if key.split(".")[0] in NIN_BACKBONE else fresh
        np.testing.assert_array_equal(variable.numpy(), expected[key].numpy(), err_msg=key)
    assert trainer.model.get_layer("embedding_fc").kernel.shape[-1] == 16
    loaded = sum(key.split(".")[0] in NIN_BACKBONE for key in fresh)
    assert trainer.restored_from == (
        f"initialised the backbone from {tf.train.latest_checkpoint(donor_dir)}: 7 layers, "
        f"conv1_1..pool2_3_bn (up to sc; {loaded} weights); {len(fresh) - loaded} weights "
        "keep their initialisation")
    assert trainer.step == 0
    trainer.close()


def test_a_backbone_of_another_shape_is_refused(tmp_path):
    donor_dir, _ = make_run_dir(tmp_path / "donor", model="nin_cifar10", head="none")
    with pytest.raises(InvalidInput, match=r"not compatible with nin_mnist: conv1_1\.kernel"):
        load_backbone(build_model("nin_mnist", head="nat", feature_dim=8), donor_dir,
                      "nin_mnist")
