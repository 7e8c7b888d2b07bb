"""The run directory: what every binary that trains writes, and what every reader rebuilds.

    <model_dir>/
        config.json         the run's settings; "model" and "model_kwargs" rebuild its network
        checkpoint, ckpt-N.*  name-keyed checkpoints (models/weights.py): the network under
                            the key "model", plus whatever else the run resumes from

`write_config` / `read_config` handle config.json (written atomically: a reader never sees
half a file); `open_checkpoints` is the checkpoint manager of a run, restored from its latest
checkpoint; `load_run_model` rebuilds a run's network and loads its weights, and
`pretraining_config` finds the run a checkpoint prefix belongs to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

CONFIG_FILE = "config.json"


def config_path(model_dir: str) -> str:
    return os.path.join(model_dir, CONFIG_FILE)


def write_json_atomic(path: str, payload) -> None:
    """Write `payload` as indented, key-sorted JSON: to a temporary file, then renamed."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def write_config(model_dir: str, config: Mapping) -> str:
    """Write `<model_dir>/config.json` (creating model_dir); returns its path."""
    path = config_path(model_dir)
    write_json_atomic(path, dict(config))
    return path


def read_config(model_dir: str) -> dict:
    """The config.json of a run.

    Raises FileNotFoundError naming the folder when it does not exist or is not a run.
    """
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"run folder {model_dir} does not exist")
    path = config_path(model_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{model_dir} has no {CONFIG_FILE}: not a run folder")
    with open(path) as f:
        return json.load(f)


def model_spec(config: Mapping) -> tuple[str, dict]:
    """(model name, build_model kwargs) recorded in a run's config."""
    for key in ("model", "model_kwargs"):
        if key not in config:
            raise ValueError(f"the run's {CONFIG_FILE} has no {key!r}")
    kwargs = dict(config["model_kwargs"])
    if kwargs.get("input_shape") is not None:
        kwargs["input_shape"] = tuple(kwargs["input_shape"])
    return config["model"], kwargs


def backbone_layers(name: str, **kwargs) -> tuple[str, ...]:
    """Names of the layers with weights in the model built without a head: the layers a
    pretraining checkpoint must provide for transfer."""
    from models import build_model

    kwargs = {**kwargs, "head": "none"}
    for key in ("feature_dim", "num_classes"):
        kwargs.pop(key, None)
    return tuple(layer.name for layer in build_model(name, **kwargs).layers if layer.weights)


def run_folder(checkpoint: str) -> str:
    """The folder of a run from its folder or one of its checkpoint prefixes."""
    return checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)


def pretraining_config(checkpoint: str) -> dict | None:
    """The config.json of the run that holds `checkpoint` (a folder or a prefix), or None."""
    if not checkpoint:
        return None
    path = config_path(run_folder(checkpoint))
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


@dataclass(frozen=True)
class LoadedModel:
    """A network rebuilt from a run: what `load_run_model` returns."""

    model: object  # keras.Model
    name: str
    kwargs: dict
    checkpoint: str | None
    loaded: int
    config: dict


def load_run_model(model_dir: str = "", model: str = "", overrides: Mapping | None = None,
                   checkpoint: str = "", init: str = "checkpoint") -> LoadedModel:
    """Rebuild a run's network from `<model_dir>/config.json` and load its latest checkpoint.

    Args:
      model_dir: the run folder ("" with `model` and init="random": no run at all).
      model: the model name, overriding config.json's (required without a config.json).
      overrides: build_model kwargs replacing those of config.json (e.g. head="softmax").
      checkpoint: a prefix or folder to load instead of model_dir's latest checkpoint.
      init: "checkpoint" loads the weights (every backbone layer must be there); "random"
        leaves the network at its initialisation.

    Raises FileNotFoundError / ValueError with a one-line message naming the folder or file.
    """
    from models import build_model
    from models.weights import load_weights, resolve_checkpoint

    config: dict = {}
    if model_dir and (init == "checkpoint" or not model):
        try:
            config = read_config(model_dir)
        except FileNotFoundError:
            if not model or not os.path.isdir(model_dir):
                raise
    name = model or config.get("model", "")
    if not name:
        raise ValueError("no model name: the run's config.json has none and none was given")
    kwargs = dict(model_spec(config)[1]) if config else {}
    kwargs.update(overrides or {})
    if kwargs.get("input_shape") is not None:
        kwargs["input_shape"] = tuple(kwargs["input_shape"])
    path, loaded = None, 0
    if init == "checkpoint":
        path = resolve_checkpoint(checkpoint or model_dir)  # before the (large) model is built
    built = build_model(name, **kwargs)
    if path is not None:
        report = load_weights(built, path, require=backbone_layers(name, **kwargs))
        path, loaded = report.checkpoint, len(report.loaded)
    return LoadedModel(built, name, kwargs, path, loaded, config)


def open_checkpoints(model_dir: str, objects: Mapping, keep: int, directory: str | None = None,
                     optional: Sequence[str] = ()):
    """The checkpoint of a run (`objects` by key, e.g. {"model": named_variables(net),
    "optimizer": opt}), its manager in `directory` (default model_dir), restored from the latest
    checkpoint there when there is one. Every object must be in that checkpoint, except those
    whose key is in `optional`, which keep their values when it lacks them (e.g. the fp16
    loss scale when a run resumes in another precision).

    Returns (checkpoint, manager, the restored prefix or None).
    """
    import tensorflow as tf

    checkpoint = tf.train.Checkpoint(**objects)
    directory = directory or model_dir
    os.makedirs(directory, exist_ok=True)
    manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)
    latest = manager.latest_checkpoint
    if latest is not None:
        saved = {name.split("/")[0] for name, _ in tf.train.list_variables(latest)}
        present = {k: v for k, v in objects.items() if k not in optional or k in saved}
        tf.train.Checkpoint(**present).restore(latest).assert_existing_objects_matched()
    return checkpoint, manager, latest
