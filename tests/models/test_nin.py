"""The network-in-network models of SC Table 4: counts from the table, shapes, the sc endpoint."""

import numpy as np
import pytest

from models import build_model
from runtime.errors import InvalidInput


def _conv(k, cin, cout, bn=True):
    """(trainable, frozen) of a conv row: no bias before BN, a bias otherwise."""
    if bn:
        return k * k * cin * cout + 2 * cout, 2 * cout
    return k * k * cin * cout + cout, 0


def _bn(c):
    return 2 * c, 2 * c


def _total(rows):
    return tuple(sum(r[i] for r in rows) for i in range(2))


# Table 4, row by row.
_TABLE4 = {
    "nin_stl10": lambda classes, cells: _total([
        _conv(5, 3, 64), _conv(1, 64, 160), _conv(1, 160, 96),
        _conv(5, 96, 192), _conv(1, 192, 192), _conv(1, 192, 192),
        _conv(3, 192, 192), _conv(1, 192, 192), _conv(1, 192, 192),
        _conv(3, 192, 256, bn=False), _conv(3, 256, 128, bn=False),
        (cells * 128 * classes + classes, 0),  # fully-connected
    ]),
    "nin_cifar10": lambda classes, cells: _total([
        _conv(3, 3, 96), _conv(3, 96, 96), _conv(3, 96, 96), _bn(96),
        _conv(3, 96, 192), _conv(3, 192, 192), _conv(3, 192, 192), _bn(192),
        _conv(3, 192, 192), _conv(1, 192, 192), _conv(1, 192, classes),
    ]),
    "nin_mnist": lambda classes, cells: _total([
        _conv(5, 1, 32, bn=False), _bn(32),
        _conv(3, 32, 64), _conv(3, 64, 64), _bn(64),
        _conv(3, 64, 128), _conv(1, 128, classes),
    ]),
}


def _counts(model):
    return (sum(int(np.prod(w.shape)) for w in model.trainable_weights),
            sum(int(np.prod(w.shape)) for w in model.non_trainable_weights))


@pytest.mark.parametrize("name,cells", [("nin_stl10", 12 * 12), ("nin_cifar10", 0),
                                        ("nin_mnist", 0)])
@pytest.mark.parametrize("classes", [10, 7])
def test_parameter_counts_follow_table_4(name, cells, classes):
    model = build_model(name, num_classes=classes)
    assert _counts(model) == _TABLE4[name](classes, cells)


def test_default_parameter_counts_are_pinned():
    assert _counts(build_model("nin_stl10")) == (1_895_370, 2_944)
    assert _counts(build_model("nin_cifar10")) == (1_371_572, 3_092)
    assert _counts(build_model("nin_mnist")) == (131_860, 724)


_SHAPES = {
    "nin_stl10": ((96, 96, 3), {"block1": (48, 48, 96), "block2": (24, 24, 192),
                                "block3": (24, 24, 192), "sc": (24, 24, 192),
                                "head": (18432,), "logits": (10,)}),
    "nin_cifar10": ((32, 32, 3), {"block1": (16, 16, 96), "block2": (8, 8, 192),
                                  "sc": (8, 8, 192), "head": (8, 8, 10), "logits": (10,)}),
    "nin_mnist": ((28, 28, 1), {"block1": (14, 14, 32), "block2": (7, 7, 64), "sc": (7, 7, 64),
                                "head": (7, 7, 10), "logits": (10,)}),
}


@pytest.mark.parametrize("name", sorted(_SHAPES))
def test_endpoint_shapes_at_the_default_size(name):
    input_shape, expected = _SHAPES[name]
    model = build_model(name)
    assert tuple(model.input.shape[1:]) == input_shape
    assert {k: tuple(v.shape[1:]) for k, v in model.output.items()} == expected


@pytest.mark.parametrize("name,size,sc", [("nin_cifar10", 40, (10, 10, 192)),
                                          ("nin_mnist", 32, (8, 8, 64)),
                                          ("nin_stl10", 64, (16, 16, 192))])
def test_endpoint_shapes_at_another_size_run_for_real(name, size, sc):
    channels = 1 if name == "nin_mnist" else 3
    model = build_model(name, input_shape=(size, size, channels))
    x = np.random.default_rng(0).normal(size=(2, size, size, channels)).astype(np.float32)
    out = model(x, training=False)
    assert tuple(out["sc"].shape) == (2, *sc)
    assert tuple(out["logits"].shape) == (2, 10)
    assert out["logits"].dtype == "float32"


@pytest.mark.parametrize("name", ["nin_cifar10", "nin_mnist", "nin_stl10"])
def test_heads_share_the_layers_up_to_sc(name):
    softmax = build_model(name)
    nat = build_model(name, head="nat", feature_dim=32)
    none = build_model(name, head="none")
    upto_sc = {w.path for w in none.weights}
    assert upto_sc <= {w.path for w in softmax.weights}
    assert upto_sc <= {w.path for w in nat.weights}
    assert set(none.output) == set(softmax.output) - {"head", "logits"}
    assert tuple(nat.output["embedding"].shape[1:]) == (32,)


def test_nat_head_embeddings_have_unit_norm():
    model = build_model("nin_mnist", head="nat", feature_dim=16)
    x = np.random.default_rng(3).uniform(0, 1, (5, 28, 28, 1)).astype(np.float32)
    z = np.asarray(model(x, training=True)["embedding"])
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)


def test_cifar_uses_leaky_relu_with_slope_point_one_and_mnist_plain_relu():
    cifar = build_model("nin_cifar10")
    assert cifar.get_layer("conv1_1_act").negative_slope == pytest.approx(0.1)
    mnist = build_model("nin_mnist")
    assert type(mnist.get_layer("conv1_1_act")).__name__ == "ReLU"
    # MNIST's first conv has no BN (Table 4), so it keeps its bias.
    assert mnist.get_layer("conv1_1").use_bias


def test_bad_arguments_are_rejected():
    with pytest.raises(InvalidInput, match="expects input_shape"):
        build_model("nin_mnist", input_shape=(28, 28, 3))
    with pytest.raises(ValueError, match="unknown head"):
        build_model("nin_cifar10", head="nat2")
