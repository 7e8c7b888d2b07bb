"""Files a reader never sees half written: every JSON and text file of a run goes through
here (a temporary file beside the target, then an atomic rename)."""

from __future__ import annotations

import json
import os
import pathlib


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
