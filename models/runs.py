"""The run directory: what every binary that trains writes, and what every reader rebuilds.

    <model_dir>/
        .lock               held (fcntl.flock) by the one process that owns the folder
        fingerprint.json    every setting that changes the result, written once, at the start
        config.json         the run's settings; "model" and "model_kwargs" rebuild its network
        checkpoint, ckpt-N.*  name-keyed checkpoints (models/weights.py): the network under
                            the key "model", plus whatever else the run resumes from

Ownership (`claim_run`, then `start_run`), for every binary that writes a run or outputs:

1. lock: an exclusive `fcntl.flock` on `<model_dir>/.lock`, held until the process ends (the
   OS releases it on any death, SIGKILL included, so a lock is never stale). A second process
   fails at once with `RunLocked`, naming the folder and the holder's PID.
2. fingerprint: the binary's settings minus those it lists as resumable (`fingerprint_of`),
   plus facts it derives (e.g. the number of images). It is compared with fingerprint.json
   before anything is restored or written; a difference fails with `RunMismatch`, naming
   every differing field with its recorded and its new value.
3. clean-up: temporaries that only a dead process can have left (checkpoint `ckpt-N_temp/`
   folders and `.tempstate` files, half-written state and JSON files) are removed, and named.
4. `start_run`: only now is anything written: fingerprint.json at the first start (never
   again), config.json (the current settings, resumable ones included) when it changed.

A start refused or failed before `start_run` leaves the folder as it was (`abandon_run`).

`write_config` / `read_config` handle config.json (files are written atomically: a reader
never sees half a file); `open_checkpoints` is a run's checkpoint manager, restored from its
latest checkpoint; `load_run_model` rebuilds a run's network and loads its weights, and
`pretraining_config` finds the run a checkpoint prefix belongs to.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

CONFIG_FILE = "config.json"
FINGERPRINT_FILE = "fingerprint.json"
LOCK_FILE = ".lock"


def config_path(model_dir: str) -> str:
    return os.path.join(model_dir, CONFIG_FILE)


def temporary_path(path: str) -> str:
    """A hidden name beside `path` for writing it before the rename (same extension, so
    writers that go by it still work). `clean_temporaries` knows the pattern."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp{os.getpid()}{os.path.splitext(name)[1]}")


def write_atomic(path: str, write) -> None:
    """`write(temporary path)`, then the rename: a reader never sees half a file. The
    temporary file is removed if `write` fails."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path` atomically (`write_atomic`)."""
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(text))


def json_text(payload) -> str:
    """Indented, key-sorted JSON (what every JSON file of a run holds)."""
    return json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"


def write_json_atomic(path: str, payload) -> None:
    """Write `payload` as indented, key-sorted JSON: to a temporary file, then renamed."""
    write_text_atomic(path, json_text(payload))


def write_json_if_changed(path: str, payload) -> bool:
    """`write_json_atomic` unless the file already holds exactly this JSON; True if written."""
    text = json_text(payload)
    if os.path.exists(path) and pathlib.Path(path).read_text() == text:
        return False
    write_text_atomic(path, text)
    return True


def read_json(path: str):
    """The JSON in `path`, or None when there is no such file."""
    path = pathlib.Path(path)
    return json.loads(path.read_text()) if path.exists() else None


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
    loss scale when a run resumes in another precision). Returns (checkpoint, manager, the
    restored prefix or None).
    """
    import tensorflow as tf

    checkpoint = tf.train.Checkpoint(**objects)
    directory = directory or model_dir
    os.makedirs(directory, exist_ok=True)
    manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)
    latest = manager.latest_checkpoint
    if latest is not None:
        status = checkpoint.restore(latest)  # restores the save counter too
        saved = {name.split("/")[0] for name, _ in tf.train.list_variables(latest)}
        present = {k: v for k, v in objects.items() if k not in optional or k in saved}
        if len(present) == len(objects):
            status.assert_existing_objects_matched()
        else:  # check everything but the optional objects the checkpoint lacks
            tf.train.Checkpoint(**present).restore(latest).assert_existing_objects_matched()
    return checkpoint, manager, latest


# ------------------------------------------------------------------------------- ownership


class RunFolderError(ValueError):
    """A run folder cannot be used as asked; the one-line message names it and what to do."""


class RunLocked(RunFolderError):
    """Another process owns the folder."""


class RunMismatch(RunFolderError):
    """The folder holds a run (or outputs) made with other settings."""


_HELD: dict[str, int] = {}  # real path of an owned folder -> descriptor of its locked .lock
_TEMPORARIES = (
    (True, re.compile(r".+-\d+_temp")),          # checkpoint being written: ckpt-N_temp/
    (False, re.compile(r".+\.tempstate\d*")),    # a tensor bundle being written
    (False, re.compile(r".+\.tmp[0-9a-f]{32}")),  # TensorFlow's atomic write of `checkpoint`
    (False, re.compile(r"\..+\.tmp\d+(\.\w+)?")),  # write_atomic of this module
)


def fingerprint_of(config, resumable, **facts) -> dict:
    """The fingerprint of a config dataclass: every field not in `resumable`, plus `facts`
    (what the binary derives, e.g. the number of images), as JSON values."""
    skip = set(resumable)
    values = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in skip}
    values.update(facts)
    return json.loads(json.dumps(values, default=str))


def differences(recorded: Mapping, current: Mapping) -> list[str]:
    """'field: recorded -> current' for every field whose value differs."""
    missing = object()
    out = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key, missing), current.get(key, missing)
        if old != new:
            show = [("(none)" if v is missing else json.dumps(v)) for v in (old, new)]
            out.append(f"{key}: {show[0]} -> {show[1]}")
    return out


def _lock_holder(path: str) -> str:
    """The PID holding the flock of `path`: from /proc/locks, else from the file itself."""
    try:
        inode = str(os.stat(path).st_ino)
        for parts in map(str.split, pathlib.Path("/proc/locks").read_text().splitlines()):
            # "3: FLOCK  ADVISORY  WRITE 4242 00:2a:123456 0 EOF" ("->" marks waiters)
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].endswith(f":{inode}"):
                return parts[4]
        return pathlib.Path(path).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _lock(folder: str, what: str) -> tuple[int, bool]:
    """An exclusive, non-blocking flock on `<folder>/.lock`: (descriptor, file created)."""
    path = os.path.join(folder, LOCK_FILE)
    while True:
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_RDWR), False
            except FileNotFoundError:  # removed meanwhile by a start that gave up
                continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLocked(f"{folder} is in use by another process (PID "
                            f"{_lock_holder(path)}): wait for it to end, or use another "
                            f"{what}") from None
        # A start that gives a folder up removes the lock file it created; a process that
        # opened that file before its removal would hold a lock nobody else sees. Keep the
        # lock only on the file that is there now.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd, created
        except FileNotFoundError:
            pass
        os.close(fd)


@dataclass
class Claim:
    """A folder this process owns (`claim_run`)."""

    folder: str
    fingerprint: dict
    fresh: bool  # no fingerprint.json yet: the first start
    removed: tuple[str, ...] = ()  # temporaries of earlier deaths, removed
    created_folder: bool = False
    created_lock: bool = False
    acquired: bool = False  # this claim took the lock (not an earlier one of this process)
    started: bool = False

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, kind, error, trace) -> None:
        """`with claim_run(...) as claim:` gives the folder up (`abandon_run`) when the block
        fails before `start_run`."""
        if kind is not None:
            abandon_run(self)


def claim_run(folder: str, fingerprint: Mapping | Callable[[], Mapping],
              what: str = "--model_dir") -> Claim:
    """Lock `folder`, compare its fingerprint and remove dead processes' temporaries (steps 1-3
    of the module docstring); the folder is created if needed.

    `fingerprint` may be a function, called once the lock is held (e.g. one that must open the
    data first, so that a second process stops before that). `what` names the flag that chose
    the folder, for the messages. Raises RunLocked, RunMismatch, or OSError for a folder that
    cannot be written; the folder is then as it was (as is it after any error of
    `fingerprint`).
    """
    folder = os.path.normpath(folder)
    key = os.path.realpath(folder)
    claim = Claim(folder, {}, fresh=False, created_folder=not os.path.isdir(folder))
    os.makedirs(folder, exist_ok=True)
    try:
        if key not in _HELD:
            _HELD[key], claim.created_lock = _lock(folder, what)
            claim.acquired = True
        found = fingerprint() if callable(fingerprint) else fingerprint
        claim.fingerprint = json.loads(json.dumps(dict(found), default=str))
        recorded = read_json(os.path.join(folder, FINGERPRINT_FILE))
        if recorded is None and any(os.path.exists(os.path.join(folder, name)) for name in (
                CONFIG_FILE, "checkpoint")):  # a run (or outputs) from before fingerprints
            raise RunMismatch(f"{folder} holds a run without {FINGERPRINT_FILE} (written by an "
                              f"earlier version of the zoo): use another {what}")
        if recorded is not None and differences(recorded, claim.fingerprint):
            raise RunMismatch(f"{folder} holds a run with other settings ("
                              f"{'; '.join(differences(recorded, claim.fingerprint))}): rerun "
                              f"with the recorded settings, or use another {what}")
    except BaseException:
        abandon_run(claim)
        raise
    claim.fresh = recorded is None
    claim.removed = clean_temporaries(folder)
    fd = _HELD[key]
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return claim


def start_run(claim: Claim, config: Mapping | None = None) -> None:
    """Step 4: write fingerprint.json (first start only) and config.json (if it changed)."""
    if claim.fresh and read_json(os.path.join(claim.folder, FINGERPRINT_FILE)) is None:
        write_json_atomic(os.path.join(claim.folder, FINGERPRINT_FILE), claim.fingerprint)
    if config is not None:
        write_json_if_changed(config_path(claim.folder), dict(config))
    claim.started = True


def abandon_run(claim: Claim) -> None:
    """After a refused or failed start: give the lock up and remove the lock file and the
    folder if this claim created them (and nothing else is in the folder). No-op once the run
    has started."""
    if claim.started:
        return
    key = os.path.realpath(claim.folder)
    if claim.acquired and key in _HELD:
        if claim.created_lock:
            os.remove(os.path.join(claim.folder, LOCK_FILE))
        os.close(_HELD.pop(key))
    if claim.created_folder:
        try:
            os.rmdir(claim.folder)
        except OSError:
            pass


def release_run(folder: str) -> None:
    """Give up the lock of a folder this process claimed (the end of the process does too)."""
    fd = _HELD.pop(os.path.realpath(folder), None)
    if fd is not None:
        os.close(fd)


def clean_temporaries(folder: str) -> tuple[str, ...]:
    """Remove the temporaries of the module docstring (step 3) from `folder`; their names.
    Only the folder's owner may: no live process may be writing them."""
    removed = tuple(name for name in sorted(os.listdir(folder)) if any(
        pattern.fullmatch(name) and os.path.isdir(os.path.join(folder, name)) == is_dir
        for is_dir, pattern in _TEMPORARIES))
    for name in removed:
        path = os.path.join(folder, name)
        (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
    return removed


@contextlib.contextmanager
def folder_lock(folder: str):
    """Hold an exclusive flock on `<folder>/.lock` (waiting for it) inside the block: for
    short critical sections shared by processes, e.g. publishing an export version."""
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
