"""What a pretraining run records beside its checkpoints, rebuilt from every process it took.

    <model_dir>/
        images.txt          a folder dataset's files (relative to the folder), line i = index
                            i: written at the first start; later starts reopen the folder from
                            it, so indices never move (data/pretrain.py)
        skipped.json        every image file the run could not use, with the reason and when
                            ("scan": left out at the first start; "training": failed later),
                            the union over all processes
        probe_history.json  [[epochs done, ...the probe's figures], ...]: each process adds the
                            epochs it probes; an epoch probed again after a resume replaces
                            its entry
        probe.png           drawn from the whole probe history
        results.json        the finished run: steps, epochs, the mean loss of its last loop
                            (kept in the checkpoint, so any process can report it), the probe
                            history, the export and the final table

Every file is written atomically and only when its content changes: rerunning a finished
run leaves them byte for byte as they were.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence

from runtime.files import read_json, temporary_path, write_json_if_changed, write_text_atomic

IMAGES = "images.txt"
SKIPPED = "skipped.json"
PROBE_HISTORY = "probe_history.json"
PROBE_PLOT = "probe.png"
RESULTS = "results.json"


# ------------------------------------------------------------------------------ the data


def images_digest(files: Sequence[str]) -> str:
    """sha256 of a folder's file list (in index order): the fingerprint's `files`."""
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


def recorded_images(model_dir: str) -> list[str] | None:
    """The file list of images.txt, or None when the run has none."""
    path = os.path.join(model_dir, IMAGES)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().splitlines()


def record_images(model_dir: str, files: Sequence[str]) -> None:
    """Write images.txt unless the run already has one (it never changes)."""
    if recorded_images(model_dir) is None:
        write_text_atomic(os.path.join(model_dir, IMAGES), "".join(f"{f}\n" for f in files))


def record_source(model_dir: str, source, files: Sequence[str]) -> str:
    """images.txt (a folder's `files`, first start) and the files the folder scan left out
    (skipped.json); returns the line to log about those ("" if none)."""
    if source.paths:
        record_images(model_dir, files)
    skipped = source.skipped
    if not skipped:
        return ""
    record_skipped(model_dir, skipped, "scan")
    names = ", ".join(os.path.relpath(p, source.root) for p, _ in skipped[:3])
    return (f"dataset {source.name}: {len(skipped)} unreadable files left out "
            f"({names}{', ...' if len(skipped) > 3 else ''}); each is listed with its reason "
            f"in {os.path.join(model_dir, SKIPPED)}")


def record_skipped(model_dir: str, entries: Iterable[tuple[str, str]], when: str
                   ) -> list[tuple[str, str]]:
    """Add the (path, reason) entries whose path skipped.json lacks; returns those."""
    path = os.path.join(model_dir, SKIPPED)
    recorded = read_json(path) or []
    known = {entry["path"] for entry in recorded}
    new = []
    for name, reason in entries:
        if name not in known:
            known.add(name)
            new.append((name, reason))
    if new:
        recorded += [{"path": name, "reason": reason, "when": when} for name, reason in new]
        write_json_if_changed(path, sorted(recorded, key=lambda entry: entry["path"]))
    return new


# ------------------------------------------------------------------------------ the results


def probe_history(model_dir: str, up_to: int | None = None) -> list[list]:
    """[[epochs done, ...]] of every probe the run recorded (up to epoch `up_to`)."""
    history = read_json(os.path.join(model_dir, PROBE_HISTORY)) or []
    return [list(entry) for entry in history if up_to is None or entry[0] <= up_to]


def record_probe(model_dir: str, entry: Sequence) -> list[list]:
    """Record a probe, `entry` = (epochs done, ...its figures), replacing the entries of that
    epoch and later ones (made by a process that died before it checkpointed them); returns
    the whole history."""
    history = [*probe_history(model_dir, int(entry[0]) - 1), json.loads(json.dumps(list(entry)))]
    write_json_if_changed(os.path.join(model_dir, PROBE_HISTORY), history)
    return history


def write_probe_plot(model_dir: str, history: Sequence,
                     plot: Callable[[Sequence, str], None]) -> bool:
    """probe.png from `history` by `plot(history, path)`, replaced only if it changed."""
    if not history:
        return False
    path = os.path.join(model_dir, PROBE_PLOT)
    tmp = temporary_path(path)
    try:
        plot(history, tmp)
        if os.path.exists(path) and filecmp.cmp(tmp, path, shallow=False):
            return False
        os.replace(tmp, path)
        return True
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def finished_results(model_dir: str, steps: int) -> dict | None:
    """results.json if it reports the run at `steps` steps (so it is the run's latest), else
    None."""
    results = read_json(os.path.join(model_dir, RESULTS))
    return results if results is not None and results.get("steps") == steps else None


def write_results(model_dir: str, summary: dict) -> bool:
    """results.json, replaced only if it changed."""
    return write_json_if_changed(os.path.join(model_dir, RESULTS), summary)
