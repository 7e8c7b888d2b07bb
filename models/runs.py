"""Rebuilding a run's network: from its config.json ("model", "model_kwargs") and its
checkpoint, for every binary that evaluates, fine-tunes or exports a run."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import keras

from models import TRANSFER_ENDPOINT, build_model
from models.weights import LoadReport, load_weights, read_model_weights
from runtime.errors import InvalidInput
from runtime.run_config import CONFIG_FILE, read_config, run_folder


def model_spec(config: Mapping) -> tuple[str, dict]:
    """(model name, build_model kwargs) recorded in a run's config."""
    for key in ("model", "model_kwargs"):
        if key not in config:
            raise InvalidInput(f"the run's {CONFIG_FILE} has no {key!r}")
    kwargs = dict(config["model_kwargs"])
    if kwargs.get("input_shape") is not None:
        kwargs["input_shape"] = tuple(kwargs["input_shape"])
    return config["model"], kwargs


def backbone_layers(name: str, **kwargs) -> tuple[str, ...]:
    """Names of the layers with weights in the model built without a head: the layers a
    pretraining checkpoint must provide for transfer."""
    kwargs = {**kwargs, "head": "none"}
    for key in ("feature_dim", "num_classes"):
        kwargs.pop(key, None)
    return tuple(layer.name for layer in build_model(name, **kwargs).layers if layer.weights)


def transfer_layers(model, name: str) -> tuple[str, ...]:
    """Names of the layers with weights that compute `model`'s transfer endpoint
    (TRANSFER_ENDPOINT[name]): its backbone, in the model's order; not the heads."""
    endpoint = keras.Model(model.inputs, model.output[TRANSFER_ENDPOINT[name]])
    ancestors = {layer.name for layer in endpoint.layers if layer.weights}
    return tuple(layer.name for layer in model.layers if layer.name in ancestors)


def load_backbone(model, checkpoint: str, name: str) -> tuple[LoadReport, str]:
    """Load into `model` (the zoo's network `name`) the layers up to its transfer endpoint
    (`transfer_layers`) from `checkpoint` (a prefix or a run folder), and nothing else: the
    heads keep their initialisation whatever the checkpoint holds for them (a NAT run of
    another --nat_dim, an SC run, a fine-tuned classifier). Every backbone layer must be in
    the checkpoint with the model's shapes (InvalidInput / MissingInput otherwise).

    Returns (the LoadReport, one line saying how many layers were loaded, and which).
    """
    layers = transfer_layers(model, name)
    report = load_weights(model, checkpoint, require=layers, layers=layers)
    return report, (f"initialised the backbone from {report.checkpoint}: {len(layers)} layers, "
                    f"{layers[0]}..{layers[-1]} (up to {TRANSFER_ENDPOINT[name]}; "
                    f"{len(report.loaded)} weights); {len(report.missing)} weights keep their "
                    "initialisation")


@dataclass(frozen=True)
class LoadedModel:
    """A network rebuilt from a run: what `load_run_model` returns."""

    model: object  # keras.Model
    name: str
    kwargs: dict
    checkpoint: str | None
    loaded: int
    config: dict
    seed: int | None = None  # the seed of a random init (None: the weights were loaded)
    step: int | None = None  # the step of `checkpoint`


def load_run_model(model_dir: str = "", model: str = "", overrides: Mapping | None = None,
                   checkpoint: str = "", init: str = "pretrained", seed: int = 0
                   ) -> LoadedModel:
    """Rebuild a run's network from `<model_dir>/config.json` and load its newest intact
    checkpoint (models/checkpoints.py: read once, checked, then used).

    Args:
      model_dir: the run folder, or one checkpoint prefix of it (the checkpoint then loaded;
        "" with `model` and init="random": no run at all).
      model: the model name, overriding config.json's (required without a config.json).
      overrides: build_model kwargs replacing those of config.json (e.g. head="softmax").
      checkpoint: a prefix or folder to load instead of model_dir's latest checkpoint.
      init: "pretrained" loads the weights (every backbone layer must be there); "random"
        leaves the network at its seeded initialisation: seeded by the run's own seed
        (config.json's "seed") when there is a run, so that it is the run's random twin (the
        network its pretraining started from), else by `seed`.
      seed: the seed of a random init without a run's seed.

    Raises MissingInput / InvalidInput (runtime/errors.py: a FileNotFoundError / ValueError)
    with a one-line message naming the folder or file.
    """
    checkpoint = checkpoint or model_dir
    model_dir = run_folder(model_dir) if model_dir else ""
    config: dict = {}
    if model_dir and (init == "pretrained" or not model or os.path.isdir(model_dir)):
        try:
            config = read_config(model_dir)
        except FileNotFoundError:
            if not model or not os.path.isdir(model_dir):
                raise
    name = model or config.get("model", "")
    if not name:
        raise InvalidInput("no model name: the run's config.json has none and none was given")
    kwargs = dict(model_spec(config)[1]) if config else {}
    kwargs.update(overrides or {})
    if kwargs.get("input_shape") is not None:
        kwargs["input_shape"] = tuple(kwargs["input_shape"])
    weights, path, loaded, init_seed, step = None, None, 0, None, None
    if init == "pretrained":
        weights = read_model_weights(checkpoint)  # before the (large) model is built
    else:
        init_seed = int(config.get("seed", seed))
        keras.utils.set_random_seed(init_seed)  # as train.pretrain.random_twin seeds the twin
    built = build_model(name, **kwargs)
    if weights is not None:
        report = load_weights(built, weights, require=backbone_layers(name, **kwargs))
        path, loaded, step = report.checkpoint, len(report.loaded), report.step
    return LoadedModel(built, name, kwargs, path, loaded, config, init_seed, step)
