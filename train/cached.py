"""Results cached in a file, keyed by what they answer.

A cached result is `{"key": ..., "result": ...}` in a JSON file. It is reused only when its key
equals the key of the question asked now: every setting that changes the result, and the
checkpoint it was computed from (`checkpoint_identity`: the prefix's name, its step and the
sha256 of its .index file, which holds every tensor's checksum). Anything else (another
setting, another checkpoint, an older file without a key) is recomputed and replaces it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable

from models.checkpoints import RETRIES, resolve_checkpoint
from runtime.errors import MissingInput
from runtime.files import read_json, write_json_atomic


def checkpoint_identity(path: str) -> dict:
    """{"checkpoint": prefix name, "step": its step or None, "index_sha256": digest} of the
    checkpoint `path` names (a prefix, or a folder's newest intact one: models/checkpoints.py)."""
    for _ in range(RETRIES):
        prefix = resolve_checkpoint(path)
        try:
            with open(prefix + ".index", "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            break
        except FileNotFoundError:  # rotated away since it was checked: resolve again
            continue
    else:
        raise MissingInput(f"the checkpoints of {path} kept vanishing while they were read")
    step = re.search(r"-(\d+)$", prefix)
    return {"checkpoint": os.path.basename(prefix), "step": int(step[1]) if step else None,
            "index_sha256": digest}


def normalised(key) -> object:
    """`key` as it reads back from JSON (tuples become lists), so that keys compare."""
    return json.loads(json.dumps(key, sort_keys=True))


def cached(path: str, key, compute: Callable[[], object], log: Callable[[str], None] = print):
    """The result stored in `path` when it was computed for `key`; otherwise `compute()`,
    stored with its key (atomically) and returned."""
    key = normalised(key)
    stored = read_json(path)
    if isinstance(stored, dict) and stored.get("key") == key and "result" in stored:
        return stored["result"]
    if stored is not None:
        log(f"{path} was computed for other settings or another checkpoint: recomputing")
    result = compute()
    write_json_atomic(path, {"key": key, "result": normalised(result)})
    return normalised(result)
