"""The model zoo: every builder returns a keras.Model whose output is a dict of endpoints.

    MODEL_NAMES        the zoo's models
    TRANSFER_ENDPOINT  name -> the endpoint used for transfer by default (paper protocol)
    PREPROCESSINGS     the fixed input fronts of AlexNet (models/layers.py)
    PRECISIONS         the compute precisions of a network (models/precision.py)
    build_model        build by name, with the builder's keyword arguments

This file imports neither Keras nor TensorFlow: binaries check their flags against these
names before the (slow) framework import, so a bad flag fails at once.
"""

from __future__ import annotations

from runtime.errors import InvalidInput

MODEL_NAMES = ("alexnet", "nin_stl10", "nin_cifar10", "nin_mnist")

# NAT transfers from conv5 (NAT Sec. 3.3); SC from the layer where its criterion sits.
TRANSFER_ENDPOINT: dict[str, str] = {
    "alexnet": "conv5",
    "nin_stl10": "sc",
    "nin_cifar10": "sc",
    "nin_mnist": "sc",
}

PREPROCESSINGS = ("sobel", "gray", "highpass", "rgb")

PRECISIONS = ("none", "bf16", "fp16")
"""Compute precision of a network: float32 throughout ("none"), or the Keras mixed policy
with bfloat16 or float16 compute and float32 variables (models/precision.py)."""


def builder(name: str):
    """The builder function of the model `name` (imports Keras)."""
    if name not in MODEL_NAMES:
        raise InvalidInput(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    if name == "alexnet":
        # deferred: the builders import Keras, and this file must not (module docstring)
        from models.alexnet import alexnet

        return alexnet
    from models import nin  # deferred: as above

    return getattr(nin, name)


def build_model(name: str, precision: str | None = None, **kwargs):
    """Build the model `name` (one of MODEL_NAMES) with the builder's keyword arguments;
    returns a keras.Model.

    `precision` (one of PRECISIONS) is the dtype policy its layers are created under
    (`models.precision.policy_scope`); None keeps the current one (float32 unless the caller
    is inside a scope). It is not a builder argument, so a run's recorded model kwargs
    rebuild the network in float32.
    """
    if precision is None:
        return builder(name)(**kwargs)
    from models.precision import policy_scope  # deferred: imports Keras (module docstring)

    with policy_scope(precision):
        return builder(name)(**kwargs)
