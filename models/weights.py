"""Model weights in checkpoints, keyed by stable layer names.

Every checkpoint of the zoo stores the model as a flat mapping `{"<layer>.<variable>": var}`
under the checkpoint key `model` (see `named_variables`). Keys depend only on layer names,
which the builders keep stable, so weights move between models that share layers: a NAT or SC
pretraining checkpoint loads into the same network with another head for transfer.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import keras
import numpy as np

from models.checkpoints import ChosenCheckpoint, read_checkpoint
from runtime.errors import InvalidInput

_PREFIX = "model/"
_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def _unescape(local_name: str) -> str:
    """Undo the checkpoint's escaping of object names ("." -> "..", "/" -> "./")."""
    return re.sub(r"\.([./])", r"\1", local_name)


def named_variables(model: keras.Model) -> dict[str, keras.Variable]:
    """{"<layer>.<variable>": variable} for every variable of `model`, for
    `tf.train.Checkpoint(model=...)`.

    Keys use the owning layer's name, so they are the same in every process and every head:
    a dropout layer's random-generator state is "fc6_dropout.seed_generator_state" whatever
    else the process has built (Keras' own path for it carries a process-wide counter).
    """
    named = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            sub = {f"{layer.name}.{k}": v for k, v in named_variables(layer).items()}
        else:
            sub = {f"{layer.name}.{v.name}": v for v in layer.variables}
        for key, variable in sub.items():
            if key in named:
                raise ValueError(f"two variables of {model.name} share the key {key!r}")
            named[key] = variable
    return named


@dataclass(frozen=True)
class LoadReport:
    """What `load_weights` did: the keys it loaded, and the model keys it left untouched."""

    checkpoint: str
    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    step: int | None = None  # the checkpoint's step


def is_model_tensor(name: str) -> bool:
    """True for the checkpoint names of `named_variables` entries (what load_weights reads)."""
    return name.startswith(_PREFIX) and name.endswith(_SUFFIX)


def read_model_weights(checkpoint: str) -> ChosenCheckpoint:
    """The checkpoint to read at `checkpoint` (a prefix, or a run folder's newest intact one:
    models/checkpoints.py), checked, with its model tensors in memory: read once, it can fill
    any number of models (`load_weights`) whatever the run's writer does meanwhile."""
    return read_checkpoint(checkpoint, is_model_tensor)


def load_weights(model: keras.Model, checkpoint: str | ChosenCheckpoint,
                 require: tuple[str, ...] = (), require_all: bool = False,
                 layers: tuple[str, ...] | None = None) -> LoadReport:
    """Copy into `model` every variable the checkpoint holds under the same key.

    Args:
      model: the model to fill.
      checkpoint: a checkpoint prefix, or a directory (its newest intact checkpoint), or the
        weights `read_model_weights` read from one.
      require: layer names that must all be loaded (for example the backbone's convs).
      require_all: every model variable must be loaded (a full resume).
      layers: when given, only the variables of these layers are read; the others keep
        their values whatever the checkpoint holds for them (reported as missing).

    Raises:
      MissingInput (a FileNotFoundError): no checkpoint at `checkpoint`; InvalidInput naming
        it when it is damaged.
      InvalidInput (a ValueError): a shape differs, nothing matches, or a required layer is
        missing; the message names the checkpoint and the first offending key.
    """
    chosen = checkpoint if isinstance(checkpoint, ChosenCheckpoint) else \
        read_model_weights(checkpoint)
    path = chosen.prefix
    stored = {  # key -> (name in the checkpoint, shape)
        _unescape(name[len(_PREFIX):-len(_SUFFIX)]): (name, np.shape(value))
        for name, value in chosen.tensors.items() if is_model_tensor(name)
    }
    loaded, missing = [], []
    for key, variable in named_variables(model).items():
        if key not in stored or (layers is not None and key.split(".")[0] not in layers):
            missing.append(key)
            continue
        name, shape = stored[key]
        if tuple(shape) != tuple(variable.shape):
            raise InvalidInput(
                f"checkpoint {path} is not compatible with {model.name}: {key} has shape "
                f"{tuple(shape)} there, {tuple(variable.shape)} in the model"
            )
        variable.assign(np.asarray(chosen.tensors[name]))
        loaded.append(key)
    if not loaded:
        raise InvalidInput(f"checkpoint {path} holds no weights of {model.name}")
    loaded_layers = {key.split(".")[0] for key in loaded}
    absent = [layer for layer in require if layer not in loaded_layers]
    if absent:
        raise InvalidInput(f"checkpoint {path} is not compatible with {model.name}: "
                           f"no weights for {', '.join(absent)}")
    if require_all and missing:
        raise InvalidInput(f"checkpoint {path} lacks {len(missing)} weights of {model.name}, "
                           f"first {missing[0]}")
    return LoadReport(os.fspath(path), tuple(loaded), tuple(missing), chosen.step)
