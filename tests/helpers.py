"""What many tests share: a run folder as the zoo writes it, a two-replica strategy, running a
binary as users do, and reading a run's summaries (with the library's own reader)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf

from models import build_model
from models.checkpoints import open_checkpoints
from models.weights import named_variables
from runtime.run_config import write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_run_dir(path, model: str = "nin_mnist", seed: int = 0, config: dict | None = None,
                 before_save=None, **model_kwargs) -> tuple[str, keras.Model]:
    """A run folder as a training binary leaves it (models/runs.py): config.json naming the
    model and its kwargs (plus `config`), and one name-keyed checkpoint of a network built
    under `seed` (and changed by `before_save(net)`, if given). Returns (the folder, the
    network)."""
    path = str(path)
    keras.utils.set_random_seed(seed)
    net = build_model(model, **model_kwargs)
    if before_save is not None:
        before_save(net)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in model_kwargs.items()}
    write_config(path, {"model": model, "model_kwargs": kwargs, **(config or {})})
    _, manager, _ = open_checkpoints(path, {"model": named_variables(net)}, keep=1)
    manager.save()
    return path, net


_KEY_BASES = itertools.count(1)


def two_replica_strategy() -> tf.distribute.MirroredStrategy:
    """A MirroredStrategy over the two logical CPUs of tests/conftest.py, with collective keys
    of its own.

    Strategies built in one process start their collective keys at the same base, so two of
    them running collectives of different shapes abort with "Shape mismatch in the collective
    instance". TensorFlow's own tests separate them with the class attribute
    `_collective_key_base`, which is read at construction only: each strategy here gets a base
    of its own, and the attribute is restored at once.
    """
    cls = tf.distribute.MirroredStrategy
    saved = cls._collective_key_base
    cls._collective_key_base = 7_000_000 + 1000 * next(_KEY_BASES)
    try:
        return cls(["/cpu:0", "/cpu:1"])
    finally:
        cls._collective_key_base = saved


def test_env(**extra) -> dict:
    """The environment of a binary run by a test: the repository on the path, no cluster."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


test_env.__test__ = False  # not a test, despite its name


def run_module(module: str, *args: str, timeout: float = 600, env: dict | None = None,
               cwd: str | None = None) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repository root (or `cwd`), as a user runs it."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd or ROOT,
                          env=env or test_env(), capture_output=True, text=True,
                          timeout=timeout)


def scalars(model_dir: str) -> dict[str, list[float]]:
    """{tag: values in step order} of a run's training summaries (`<model_dir>/train`)."""
    from evaluation.visualize_lib import read_scalars

    return {tag: list(values) for tag, (_, values) in
            read_scalars(os.path.join(str(model_dir), "train")).items()}


def folder_contents(folder) -> dict[str, bytes]:
    """Every file under `folder`: relative path -> contents (to show that nothing changed)."""
    found = {}
    for root, _, files in os.walk(str(folder)):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, str(folder))] = f.read()
    return found


def checkpoint_tensors(prefix: str) -> dict[str, np.ndarray]:
    """Every saved variable of a checkpoint, by key (not its object graph, which also holds
    the names Keras gave Python objects, e.g. "sgd_1" for a process's second optimizer)."""
    reader = tf.train.load_checkpoint(str(prefix))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if key != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def is_permutation(values) -> bool:
    """True when `values` holds each of 0..len-1 exactly once."""
    values = np.asarray(values)
    return bool(np.array_equal(np.sort(values), np.arange(len(values))))


def assignment(model_dir: str) -> np.ndarray:
    """The NAT assignment of a run's latest checkpoint."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir)))
    return reader.get_tensor("nat/assignment/.ATTRIBUTES/VARIABLE_VALUE")
