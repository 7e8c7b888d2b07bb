"""Who owns a run folder, for every binary that writes a run or outputs.

    <folder>/
        .lock               held (fcntl.flock) by the one process that owns the folder
        fingerprint.json    every setting that changes the result, written once, at the start
        config.json         the current settings (runtime/run_config.py)

Ownership (`claim_run`, then `start_run`):

1. lock: an exclusive `fcntl.flock` on `<folder>/.lock`, held until the process ends (the
   OS releases it on any death, SIGKILL included, so a lock is never stale). A second process
   fails at once with `RunLocked`, naming the folder and the holder's PID.
2. fingerprint: the binary's settings minus those it lists as resumable (`fingerprint_of`),
   plus facts it derives (e.g. the number of images). It is compared with fingerprint.json
   before anything is restored or written; a difference fails with `RunMismatch`, naming
   every differing field with its recorded and its new value.
3. clean-up: temporaries that only a dead process can have left (checkpoint `ckpt-N_temp/`
   folders and `.tempstate` files, half-written state and JSON files) are removed, and named.
4. `start_run`: only now is anything written: fingerprint.json at the first start (never
   again), config.json (the current settings, resumable ones included, and under "code" the
   version of the code, runtime/version.py, which is not in the fingerprint) when it changed.

A start refused or failed before `start_run` leaves the folder as it was (`abandon_run`).
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

from runtime.errors import InvalidInput
from runtime.files import read_json, write_json_atomic, write_json_if_changed
from runtime.run_config import CONFIG_FILE, config_path
from runtime.version import code_version

FINGERPRINT_FILE = "fingerprint.json"
LOCK_FILE = ".lock"


class RunFolderError(InvalidInput):
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
    """Step 4: write fingerprint.json (first start only) and config.json (if it changed), with
    the code version under "code"."""
    if claim.fresh and read_json(os.path.join(claim.folder, FINGERPRINT_FILE)) is None:
        write_json_atomic(os.path.join(claim.folder, FINGERPRINT_FILE), claim.fingerprint)
    if config is not None:
        write_json_if_changed(config_path(claim.folder), {**config, "code": code_version()})
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
