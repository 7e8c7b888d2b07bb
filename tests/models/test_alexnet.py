"""AlexNet (BN, Sobel front): parameter counts from the layer sizes, shapes, unit embeddings."""

import numpy as np
import pytest

from models import build_model
from runtime.errors import InvalidInput

# (name, kernel, in_channels, out_channels): conv1..conv5 of NAT's AlexNet, without bias
# (the BN that follows carries the shift).
_CONVS = [("conv1", 11, None, 96), ("conv2", 5, 96, 256), ("conv3", 3, 256, 384),
          ("conv4", 3, 384, 384), ("conv5", 3, 384, 256)]
_FRONT_CHANNELS = {"sobel": 2, "gray": 1, "highpass": 3, "rgb": 3}


def _expected_counts(preprocessing: str, head: str, pool5_cells: int, feature_dim: int = 2048,
                     num_classes: int = 1000) -> tuple[int, int]:
    """(trainable, frozen) from the architecture, independently of Keras' bookkeeping."""
    trainable, frozen = 0, 0
    if preprocessing == "sobel":
        frozen += 3 * 3 * 1 * 2 + 2  # fixed kernel and zero bias
    in_channels = _FRONT_CHANNELS[preprocessing]
    for _, k, cin, cout in _CONVS:
        cin = in_channels if cin is None else cin
        trainable += k * k * cin * cout + 2 * cout  # kernel, BN gamma and beta
        frozen += 2 * cout  # BN moving mean and variance
    fan_in = pool5_cells * 256
    for units in (4096, 4096):
        trainable += fan_in * units + 2 * units
        frozen += 2 * units
        fan_in = units
    if head == "nat":
        trainable += 4096 * feature_dim + feature_dim
    elif head == "softmax":
        trainable += 4096 * num_classes + num_classes
    return trainable, frozen


def _counts(model) -> tuple[int, int]:
    return (sum(int(np.prod(w.shape)) for w in model.trainable_weights),
            sum(int(np.prod(w.shape)) for w in model.non_trainable_weights))


@pytest.mark.parametrize("preprocessing,head", [
    ("sobel", "nat"), ("rgb", "softmax"), ("gray", "none"), ("highpass", "nat")])
def test_parameter_counts_follow_from_the_layer_sizes(preprocessing, head):
    model = build_model("alexnet", preprocessing=preprocessing, head=head)
    assert _counts(model) == _expected_counts(preprocessing, head, pool5_cells=36)


def test_default_parameter_count_is_pinned():
    # The default NAT AlexNet (Sobel, d = 2048): this number is the checkpoint format's footprint.
    model = build_model("alexnet")
    assert _counts(model) == (66_669_952, 19_156)
    assert _counts(model) == _expected_counts("sobel", "nat", 36)


_SHAPES_224 = {"conv1": (55, 55, 96), "conv2": (27, 27, 256), "conv3": (13, 13, 384),
               "conv4": (13, 13, 384), "conv5": (13, 13, 256), "pool5": (6, 6, 256),
               "fc6": (4096,), "fc7": (4096,)}


@pytest.mark.parametrize("size,conv1", [(224, 55), (227, 56)])
def test_endpoint_shapes_at_224_and_227(size, conv1):
    model = build_model("alexnet", input_shape=(size, size, 3), feature_dim=64)
    shapes = {k: tuple(v.shape[1:]) for k, v in model.output.items()}
    expected = dict(_SHAPES_224, conv1=(conv1, conv1, 96), embedding=(64,))
    assert shapes == expected
    # pool5 is 6x6 at both sizes, so fc6 transfers from 224 pretraining to the 227 VOC protocol.
    assert _counts(model) == _expected_counts("sobel", "nat", 36, feature_dim=64)


def test_endpoint_shapes_at_a_small_input_run_for_real():
    model = build_model("alexnet", input_shape=(99, 99, 3), head="softmax", num_classes=7)
    x = np.random.default_rng(0).uniform(0, 1, (2, 99, 99, 3)).astype(np.float32)
    out = model(x, training=False)
    assert out["conv1"].shape == (2, 24, 24, 96)
    assert out["conv5"].shape == (2, 5, 5, 256)
    assert out["pool5"].shape == (2, 2, 2, 256)
    assert out["logits"].shape == (2, 7)
    assert out["logits"].dtype == "float32"


@pytest.mark.parametrize("batch", [1, 8])
def test_embedding_rows_have_unit_norm(batch):
    model = build_model("alexnet", feature_dim=128)
    x = np.random.default_rng(batch).uniform(0, 255, (batch, 224, 224, 3)).astype(np.float32)
    # In training mode a batch of one is degenerate for the fc BN layers (every activation
    # equals the batch mean), so batch 1 is checked in inference mode only.
    for training in (False, True) if batch > 1 else (False,):
        z = np.asarray(model(x, training=training)["embedding"])
        assert z.shape == (batch, 128)
        np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)


def test_sobel_front_is_frozen_and_the_convs_see_two_channels():
    model = build_model("alexnet")
    assert model.get_layer("sobel").trainable_weights == []
    assert tuple(model.get_layer("conv1").kernel.shape) == (11, 11, 2, 96)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown head"):
        build_model("alexnet", head="svm")
    with pytest.raises(ValueError, match="unknown preprocessing"):
        build_model("alexnet", preprocessing="hsv")
    with pytest.raises(InvalidInput, match="too small"):
        build_model("alexnet", input_shape=(32, 32, 3))
