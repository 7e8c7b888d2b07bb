"""A run's checkpoints: finding the one to read, and the manager that writes and restores
them (model, optimizer and whatever else a run resumes from, by key)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import tensorflow as tf

from runtime.errors import MissingInput


def resolve_checkpoint(path: str) -> str:
    """A checkpoint prefix from a prefix or a directory (its latest checkpoint).

    Raises MissingInput (a FileNotFoundError) naming `path` when it does not exist or holds
    no checkpoint.
    """
    if tf.io.gfile.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise MissingInput(f"no checkpoint in directory {path}")
        return latest
    if tf.io.gfile.exists(path + ".index"):
        return path
    if not tf.io.gfile.exists(path):
        raise MissingInput(f"{path} does not exist: give a run folder or a checkpoint "
                           "prefix")
    raise MissingInput(f"no checkpoint at {path} (expected {path}.index)")


def open_checkpoints(model_dir: str, objects: Mapping, keep: int, directory: str | None = None,
                     optional: Sequence[str] = ()):
    """The checkpoint of a run (`objects` by key, e.g. {"model": named_variables(net),
    "optimizer": opt}), its manager in `directory` (default model_dir), restored from the latest
    checkpoint there when there is one. Every object must be in that checkpoint, except those
    whose key is in `optional`, which keep their values when it lacks them (e.g. the fp16
    loss scale when a run resumes in another precision). Returns (checkpoint, manager, the
    restored prefix or None).
    """
    checkpoint = tf.train.Checkpoint(**objects)
    directory = directory or model_dir
    os.makedirs(directory, exist_ok=True)
    manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)
    # Restored from model_dir's latest whichever folder the manager writes to: the workers of a
    # cluster all resume the run folder's checkpoint (train/cluster.py).
    latest = tf.train.latest_checkpoint(model_dir) if directory != model_dir else \
        manager.latest_checkpoint
    if latest is not None:
        status = checkpoint.restore(latest)  # restores the save counter too
        saved = {name.split("/")[0] for name, _ in tf.train.list_variables(latest)}
        present = {k: v for k, v in objects.items() if k not in optional or k in saved}
        if len(present) == len(objects):
            status.assert_existing_objects_matched()
        else:  # check everything but the optional objects the checkpoint lacks
            tf.train.Checkpoint(**present).restore(latest).assert_existing_objects_matched()
    return checkpoint, manager, latest
