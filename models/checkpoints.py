"""A run's checkpoints: finding the one to read, and the manager that writes and restores
them (model, optimizer and whatever else a run resumes from, by key).

The checkpoint to read: every reader of a run (resume, probes, fine-tuning, export, VOC, cached
results) reads through `read_checkpoint` / `resolve_checkpoint`, which pick one checkpoint and
check it before anything uses it:

- intact means the `.index` opens and every tensor it lists reads back in full from the data
  shards, each checked against the CRC32C the index stores for it (TensorFlow's bundle reader
  checks it on every read), so a truncated shard ("Read less bytes than requested") and
  flipped bytes ("Checksum does not match") are both caught. That costs one read of the
  checkpoint; the tensors a reader wants are kept from that same read, so the checked bytes
  are the bytes used.
- a folder: its newest intact checkpoint (by step, from the `checkpoint` state file's list and
  the folder's `*.index` files). When newer ones are damaged, ONE line names them and the one
  used (`skipped_line`), shown once per process on stderr (or given to the caller's `log`);
  none intact: one line naming the folder. A checkpoint that vanishes while it is read (a
  live run's writer rotated it away: it saves the newer one first) is not the user's fault:
  the folder is listed again, a few times, after a short sleep.
- a prefix given explicitly: that one, or one line naming it (no fallback).
"""

from __future__ import annotations

import glob
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import tensorflow as tf

from runtime.errors import InvalidInput, MissingInput

RETRIES = 5  # listings of a folder whose checkpoints vanish while they are read
RETRY_SECONDS = 0.2
_STEP = re.compile(r"-(\d+)$")
_shown: set[str] = set()


def checkpoint_step(prefix: str) -> int | None:
    """The step in a prefix's name (`ckpt-<step>`), or None."""
    match = _STEP.search(prefix)
    return int(match[1]) if match else None


def warn_once(line: str) -> None:
    """`warning: <line>` on stderr, once per process (several readers may pick one run)."""
    if line not in _shown:
        _shown.add(line)
        sys.stderr.write(f"warning: {line}\n")
        sys.stderr.flush()


class Damaged(InvalidInput):
    """A checkpoint whose index or data does not read back intact (the message names it)."""

    def __init__(self, message: str, prefix: str = "", reason: str = ""):
        super().__init__(message)
        self.prefix, self.reason = prefix, reason


class _Vanished(Exception):
    """The checkpoint's files were removed while it was read."""


@dataclass(frozen=True)
class ChosenCheckpoint:
    """The checkpoint a reader uses: its prefix, step, the damaged newer ones it skipped
    ((prefix, reason) pairs), and the tensors it asked for, as read while it was checked."""

    prefix: str
    step: int | None
    skipped: tuple[tuple[str, str], ...] = ()
    tensors: Mapping = field(default_factory=dict, repr=False)

    def skipped_line(self) -> str | None:
        """One line naming the damaged checkpoints skipped and the one used, or None."""
        if not self.skipped:
            return None
        damaged = "; ".join(f"{prefix} ({reason})" for prefix, reason in self.skipped)
        return (f"skipped damaged checkpoint {damaged}: using {self.prefix} (step "
                f"{self.step}) instead")

    def record(self) -> dict:
        """{"path", "step"}: what a results file records of the checkpoint it comes from."""
        return {"path": self.prefix, "step": self.step}


def _reason(error: BaseException) -> str:
    text = (getattr(error, "message", None) or str(error) or type(error).__name__).strip()
    text = " ".join(text.splitlines()[0].split())
    return f"truncated: {text}" if isinstance(error, IndexError) else text


def check_checkpoint(prefix: str, want: Callable[[str], bool] | None = None) -> dict:
    """Read every tensor of checkpoint `prefix` (see the module docstring); returns
    {name: array} of the names `want` accepts. Raises Damaged naming the prefix (and the
    first tensor that failed), or _Vanished when its files were removed meanwhile."""
    tensors = {}
    name = "the index"
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in sorted(reader.get_variable_to_shape_map()):
            value = reader.get_tensor(name)
            if want is not None and want(name):
                tensors[name] = value
    except (tf.errors.OpError, IndexError, ValueError, OSError) as error:
        if not os.path.exists(prefix + ".index"):
            raise _Vanished(prefix) from None
        reason = f"{_reason(error)}, reading {name}"
        raise Damaged(f"checkpoint {prefix} is damaged ({reason})", prefix, reason) from None
    return tensors


def list_checkpoints(folder: str) -> list[str]:
    """The checkpoint prefixes of `folder` that have an `.index`, newest (highest step, then
    latest written) first: those the `checkpoint` state file lists and every `*.index`."""
    prefixes = {path[:-len(".index")] for path in glob.glob(os.path.join(glob.escape(folder),
                                                                          "*.index"))}
    try:
        state = tf.train.get_checkpoint_state(folder)
    except (tf.errors.OpError, ValueError):  # a damaged state file: the .index files remain
        state = None
    if state is not None:
        prefixes.update(os.path.join(folder, p) for p in state.all_model_checkpoint_paths)
        prefixes.add(os.path.join(folder, state.model_checkpoint_path))
    stamped = []
    for prefix in prefixes:
        step = checkpoint_step(prefix)
        try:
            stamped.append((-1 if step is None else step, os.path.getmtime(prefix + ".index"),
                            os.path.normpath(prefix)))
        except OSError:  # listed, but not (or no longer) there
            continue
    return [prefix for *_, prefix in sorted(set(stamped), reverse=True)]


def _newest_intact(folder: str, want) -> ChosenCheckpoint:
    for attempt in range(RETRIES):
        if attempt:
            time.sleep(RETRY_SECONDS)
        listed, skipped, vanished = list_checkpoints(folder), [], False
        for prefix in listed:
            try:
                tensors = check_checkpoint(prefix, want)
            except Damaged as error:
                skipped.append((prefix, error.reason))
                continue
            except _Vanished:
                vanished = True
                break
            return ChosenCheckpoint(prefix, checkpoint_step(prefix), tuple(skipped), tensors)
        if not listed:
            raise MissingInput(f"no checkpoint in directory {folder}")
        if not vanished and all(os.path.exists(p + ".index") for p, _ in skipped):
            newest, reason = skipped[0]
            raise Damaged(f"no intact checkpoint in {folder}: all {len(skipped)} are damaged "
                          f"(newest {os.path.basename(newest)}: {reason})")
    raise MissingInput(f"the checkpoints of {folder} kept vanishing while they were read "
                       f"({RETRIES} tries): is a run rotating them faster than they can be read?")


def read_checkpoint(path: str, want: Callable[[str], bool] | None = None,
                    log: Callable[[str], None] | None = warn_once) -> ChosenCheckpoint:
    """The checkpoint to read at `path` (a run folder: its newest intact checkpoint; a prefix:
    that one), checked, with the tensors `want` accepts (module docstring). A skipped damaged
    checkpoint is said in one line to `log` (None: only in the result's `skipped_line`).

    Raises MissingInput (a FileNotFoundError) / Damaged (an InvalidInput, a ValueError) with one
    line naming `path`.
    """
    if tf.io.gfile.isdir(path):
        chosen = _newest_intact(os.path.normpath(path), want)
        if chosen.skipped and log is not None:
            log(chosen.skipped_line())
        return chosen
    if tf.io.gfile.exists(path + ".index"):
        try:
            return ChosenCheckpoint(path, checkpoint_step(path), (), check_checkpoint(path, want))
        except _Vanished:
            pass
    if not tf.io.gfile.exists(path):
        raise MissingInput(f"{path} does not exist: give a run folder or a checkpoint "
                           "prefix")
    raise MissingInput(f"no checkpoint at {path} (expected {path}.index)")


def resolve_checkpoint(path: str, log: Callable[[str], None] | None = warn_once) -> str:
    """The prefix of the checkpoint to read at `path` (`read_checkpoint`, keeping no tensors)."""
    return read_checkpoint(path, None, log).prefix


def open_checkpoints(model_dir: str, objects: Mapping, keep: int, directory: str | None = None,
                     optional: Sequence[str] = ()):
    """The checkpoint of a run (`objects` by key, e.g. {"model": named_variables(net),
    "optimizer": opt}), its manager in `directory` (default model_dir), restored from the latest
    intact checkpoint there when there is one (`read_checkpoint`: a damaged newer one is
    skipped with one line; none intact: Damaged). Every object must be in that checkpoint,
    except those whose key is in `optional`, which keep their values when it lacks them (e.g.
    the fp16 loss scale when a run resumes in another precision). Returns (checkpoint, manager, the
    restored prefix or None).
    """
    checkpoint = tf.train.Checkpoint(**objects)
    directory = directory or model_dir
    os.makedirs(directory, exist_ok=True)
    manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)
    # Restored from model_dir's newest intact checkpoint whichever folder the manager writes
    # to: the workers of a cluster all resume the run folder's checkpoint (train/cluster.py).
    latest = None
    if list_checkpoints(model_dir):  # the newest intact one (module docstring)
        latest = read_checkpoint(model_dir).prefix
        status = checkpoint.restore(latest)  # restores the save counter too
        saved = {name.split("/")[0] for name, _ in tf.train.list_variables(latest)}
        present = {k: v for k, v in objects.items() if k not in optional or k in saved}
        if len(present) == len(objects):
            status.assert_existing_objects_matched()
        else:  # check everything but the optional objects the checkpoint lacks
            tf.train.Checkpoint(**present).restore(latest).assert_existing_objects_matched()
    return checkpoint, manager, latest
