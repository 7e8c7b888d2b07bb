"""A run's config.json: its settings, written by the binary that owns the run folder and read
by every binary that rebuilds or evaluates the run.

    <model_dir>/config.json   the run's settings; "model" and "model_kwargs" rebuild its
                              network (models/runs.py)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from runtime.errors import InvalidInput, MissingInput
from runtime.files import write_json_atomic

CONFIG_FILE = "config.json"


def config_path(model_dir: str) -> str:
    return os.path.join(model_dir, CONFIG_FILE)


def write_config(model_dir: str, config: Mapping) -> str:
    """Write `<model_dir>/config.json` (creating model_dir); returns its path."""
    path = config_path(model_dir)
    write_json_atomic(path, dict(config))
    return path


def read_config(model_dir: str) -> dict:
    """The config.json of a run.

    Raises MissingInput (a FileNotFoundError) naming the folder when it does not exist or is
    not a run, InvalidInput when its config.json is not JSON.
    """
    if not os.path.isdir(model_dir):
        raise MissingInput(f"run folder {model_dir} does not exist")
    path = config_path(model_dir)
    if not os.path.exists(path):
        raise MissingInput(f"{model_dir} has no {CONFIG_FILE}: not a run folder")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise InvalidInput(f"{path} is not valid JSON ({error}): restore it, or use "
                               "another run folder") from None


def run_folder(checkpoint: str) -> str:
    """The folder of a run from its folder or one of its checkpoint prefixes (a path whose
    `.index` file exists, or a path in a folder with a config.json); any other path (a folder
    that does not exist yet, say) is returned as it is."""
    if os.path.isdir(checkpoint):
        return checkpoint
    parent = os.path.dirname(checkpoint)
    prefix = os.path.exists(f"{checkpoint}.index") or os.path.exists(config_path(parent))
    return parent if prefix else checkpoint


def pretraining_config(checkpoint: str) -> dict | None:
    """The config.json of the run that holds `checkpoint` (a folder or a prefix), or None."""
    if not checkpoint:
        return None
    path = config_path(run_folder(checkpoint))
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
