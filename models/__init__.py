"""The model zoo: every builder returns a keras.Model whose output is a dict of endpoints.

    MODELS            name -> builder
    build_model       build by name, with the builder's keyword arguments
    TRANSFER_ENDPOINT name -> the endpoint used for transfer by default (paper protocol)
"""

from __future__ import annotations

from collections.abc import Callable

import keras

from models.alexnet import alexnet
from models.nin import nin_cifar10, nin_mnist, nin_stl10

MODELS: dict[str, Callable[..., keras.Model]] = {
    "alexnet": alexnet,
    "nin_stl10": nin_stl10,
    "nin_cifar10": nin_cifar10,
    "nin_mnist": nin_mnist,
}

# NAT transfers from conv5 (NAT Sec. 3.3); SC from the layer where its criterion sits.
TRANSFER_ENDPOINT: dict[str, str] = {
    "alexnet": "conv5",
    "nin_stl10": "sc",
    "nin_cifar10": "sc",
    "nin_mnist": "sc",
}


def build_model(name: str, **kwargs) -> keras.Model:
    """Build the model `name` (a key of MODELS) with the builder's keyword arguments."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)
