"""`run` of `python -m serving.export`, whose docstring states the protocol."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict

import tensorflow as tf

from models import TRANSFER_ENDPOINT
from models import pooling as pooling_lib
from models.runs import load_run_model
from runtime.errors import InvalidInput
from runtime.run_config import run_folder
from serving.export import ExportConfig, parse_endpoints
from serving.graph import endpoint_shape, feature_module, input_size, output_shapes, signatures
from serving.signatures import INPUTS, METADATA_FILE

_DEFAULT_TRANSFER_POOLING = {"alexnet": ("max", 6, 6)}
_STAGING = re.compile(r"\.tmp-\d+-\d+")
# What makes two exports the same (module docstring).
IDENTITY = ("model", "model_kwargs", "input_size", "endpoints", "checkpoint",
            "checkpoint_digest")


@contextlib.contextmanager
def folder_lock(folder: str):
    """Hold an exclusive flock on `<folder>/.lock` (waiting for it) inside the block: the
    processes that publish versions of one model take turns."""
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def default_endpoints(model, architecture: str | None = None) -> dict[str, str]:
    """{transfer endpoint: default pooling} for a model of the zoo."""
    architecture = architecture or model.name
    if architecture not in TRANSFER_ENDPOINT:
        raise ValueError(f"no default endpoint for model {architecture!r}; pass endpoints "
                         f"(known models: {', '.join(sorted(TRANSFER_ENDPOINT))})")
    endpoint = TRANSFER_ENDPOINT[architecture]
    return {endpoint: default_pooling(model, endpoint, architecture)}


def default_pooling(model, endpoint: str, architecture: str | None = None) -> str:
    """The pooling used when none is stated (see the module docstring)."""
    architecture = architecture or model.name
    shape = endpoint_shape(model, endpoint)
    if TRANSFER_ENDPOINT.get(architecture) == endpoint and architecture in \
            _DEFAULT_TRANSFER_POOLING:
        # maxKxL, with K, L capped by a smaller map (conv5 of a small input).
        mode, rows, cols = _DEFAULT_TRANSFER_POOLING[architecture]
        return pooling_lib.adaptive(mode, min(rows, shape[0]), min(cols, shape[1]))
    return "flatten" if len(shape) == 3 else "none"


def next_version(model_base: str) -> int:
    """1 + the largest integer directory name in `model_base` (1 when there is none)."""
    versions = _versions(model_base)
    return max(versions, default=0) + 1


def _versions(model_base: str) -> list[int]:
    if not os.path.isdir(model_base):
        return []
    return [int(name) for name in os.listdir(model_base) if name.isdigit()]


def checkpoint_digest(prefix: str | None) -> str | None:
    """sha256 of a checkpoint's `.index` (it holds a checksum of every tensor), or None."""
    if not prefix or not os.path.exists(f"{prefix}.index"):
        return None
    with open(f"{prefix}.index", "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def same_export(model_base: str, info: Mapping) -> str | None:
    """The latest version in `model_base` if it holds the export `info` describes (the IDENTITY
    fields; a checkpoint is required), else None."""
    versions = _versions(model_base)
    if info.get("checkpoint") is None or not versions:
        return None
    latest = os.path.join(model_base, str(max(versions)))
    try:
        found = read_metadata(latest)
    except (OSError, ValueError):  # an export of another tool, or damaged: not the same
        return None
    return latest if all(found.get(k) == info.get(k) for k in IDENTITY) else None


def clean_staging(model_base: str, log: Callable[[str], None] | None = None) -> tuple[str, ...]:
    """Remove the staging folders that dead exports left in `model_base` (waiting for a live
    export there to finish first); returns their names."""
    if not os.path.isdir(model_base):
        return ()
    with folder_lock(model_base):
        return _remove_staging(model_base, log)


def _remove_staging(model_base: str, log) -> tuple[str, ...]:
    removed = tuple(sorted(n for n in os.listdir(model_base) if _STAGING.fullmatch(n)))
    for name in removed:
        shutil.rmtree(os.path.join(model_base, name))
    if removed and log is not None:
        log(f"removed {len(removed)} unfinished export(s) of an interrupted process from "
            f"{model_base}: {', '.join(removed)}")
    return removed


def export_features(model, export_base: str, model_name: str,
                    endpoints: dict[str, str] | None = None,
                    metadata: dict | None = None,
                    log: Callable[[str], None] | None = None) -> str:
    """Write the feature extractor of `model` as `<export_base>/<model_name>/<version>/`,
    unless the latest version already holds this export (module docstring).

    Args:
      model: a zoo model (output: a dict of endpoints; static input [H, W, 1 or 3]).
      export_base: the model server's base directory.
      model_name: the name the server serves it under ([A-Za-z0-9_.-]+).
      endpoints: {endpoint: pooling}; None means the model's transfer endpoint with its default
        pooling. A pooling of None or "" also takes the default.
      metadata: extra JSON-serialisable facts for the asset (for example "checkpoint",
        "model_kwargs"); "model" names the architecture when `model.name` is not one.
      log: where to say that an existing version was reused, or staging folders removed.

    Returns:
      The version directory written (or reused).
    """
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", model_name or ""):
        raise InvalidInput(f"model_name must match [A-Za-z0-9_.-]+; got {model_name!r}")
    metadata = dict(metadata or {})
    architecture = metadata.get("model", model.name)
    size = input_size(model)
    if endpoints is None:
        endpoints = default_endpoints(model, architecture)
    if not endpoints:
        raise ValueError("endpoints must name at least one endpoint")
    endpoints = {name: pooling or default_pooling(model, name, architecture)
                 for name, pooling in endpoints.items()}
    shapes = output_shapes(model, endpoints)
    checkpoint = metadata.pop("checkpoint", None)
    info = {
        "model_name": model_name,
        "model": architecture,
        "input_size": list(size),
        "endpoints": {name: {"pooling": pooling, "shape": shapes[name]}
                      for name, pooling in endpoints.items()},
        "signatures": INPUTS,
        "checkpoint": checkpoint,
        "checkpoint_digest": checkpoint_digest(checkpoint),
        **{k: v for k, v in metadata.items() if k != "model"},
    }
    text = json.dumps(info, indent=2, sort_keys=True)
    model_base = os.path.join(export_base, model_name)
    with folder_lock(model_base):
        _remove_staging(model_base, log)
        existing = same_export(model_base, json.loads(text))
        if existing is not None:
            if log is not None:
                log(f"{existing} already holds this export (checkpoint {checkpoint}): nothing "
                    "new published")
            return existing
        return _write_version(model, model_base, endpoints, text)


def _write_version(model, model_base: str, endpoints: dict, text: str) -> str:
    """Stage the SavedModel, then rename it to the next version (the caller holds the lock)."""
    version = next_version(model_base)
    final = os.path.join(model_base, str(version))
    staging = os.path.join(model_base, f".tmp-{version}-{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            asset = os.path.join(scratch, METADATA_FILE)
            with open(asset, "w") as f:
                f.write(text + "\n")
            module = feature_module(model, endpoints, text, asset)
            tf.saved_model.save(module, staging, signatures=signatures(module))
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # e.g. a full disk: leave nothing half-done
        raise
    return final


def read_metadata(version_dir: str) -> dict:
    """The JSON asset of an export."""
    with open(os.path.join(version_dir, "assets", METADATA_FILE)) as f:
        return json.load(f)




def run(config: ExportConfig) -> str:
    """Build the model, load its weights (one checkpoint, read once: models/checkpoints.py),
    export; prints and returns the version directory."""
    loaded = load_run_model(config.pretrained, config.model, config.overrides(),
                            init=config.init, seed=config.seed)
    metadata = {"model": loaded.name, "model_kwargs": loaded.kwargs,
                "checkpoint": loaded.checkpoint, "checkpoint_step": loaded.step,
                # now, not at writing time, when a live run may have rotated it away
                "checkpoint_digest": checkpoint_digest(loaded.checkpoint),
                "init": config.init, "export_flags": asdict(config)}
    if loaded.seed is not None:
        metadata["init_seed"] = loaded.seed
    for key in ("method", "dataset"):
        if key in loaded.config:
            metadata[key] = loaded.config[key]
    base = config.export_base or os.path.join(run_folder(config.pretrained), "export")
    path = export_features(loaded.model, base, config.model_name or loaded.name,
                           parse_endpoints(config.endpoints), metadata, log=print)
    print(path)
    return path
