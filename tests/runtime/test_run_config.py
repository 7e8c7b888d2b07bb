"""A run's config.json (runtime/run_config.py)."""

import json
import os

from runtime.run_config import pretraining_config, write_config


def test_config_is_written_atomically_and_found_from_a_prefix(tmp_path):
    path = write_config(str(tmp_path / "run"), {"model": "alexnet", "model_kwargs": {}, "b": 1})
    assert json.loads(open(path).read())["b"] == 1
    assert os.listdir(tmp_path / "run") == ["config.json"]  # no temporary file left
    assert pretraining_config(str(tmp_path / "run" / "ckpt-3"))["model"] == "alexnet"
    assert pretraining_config(str(tmp_path / "run")) is not None
    assert pretraining_config(str(tmp_path)) is None and pretraining_config("") is None
