"""SavedModel export of a feature extractor, in TensorFlow Serving's layout.

`export_features(model, export_base, model_name, endpoints)` writes

    <export_base>/<model_name>/<version>/        version = 1 + the largest integer already there
        saved_model.pb, variables/
        assets/features.json                     model, endpoints, input size, checkpoint, ...

The version directory is written under a hidden temporary name (`.tmp-<version>-<pid>`) and
renamed when complete, so a model server polling `<export_base>/<model_name>` never loads a
half-written version. Exports into one model base take turns (an flock on its `.lock`, which
the server ignores); whoever holds it first removes staging folders that dead exports left.

Exporting is idempotent: when the latest version holds the same export (same model and
build_model kwargs, input size, endpoints with their poolings, and the same checkpoint: its
path and a digest of its `.index`, which holds a checksum of every tensor), nothing new is
published and that version is returned. An export without a checkpoint (random init) is
always a new version.

Signatures (serving/signatures.py; every output is a dict {endpoint name: float32 features}):

    serving_default   images: float32 [N, H, W, C], values in [0, 1]
    serving_uint8     images: uint8   [N, H, W, C], values in [0, 255] (divided by 255)
    image_bytes       image_bytes: string [N], encoded JPEG / PNG / GIF / BMP / WebP files

The restored object also has `features(images)`, one function traced for both image dtypes,
and `metadata()`, the JSON of the asset as a string tensor.

Image convention (the zoo's, `data.images`): the model takes float32 images in [0, 1]. Inside
the graph:
- uint8 is cast to float32 and divided by 255; float32 is taken as already in [0, 1];
- C must be 1 or 3, else the call fails with "images must have 1 (grayscale) or 3 (RGB)
  channels"; then the channel and resize rule of `data.images.resize_to_input`;
- float32 images must be finite: a NaN or Inf pixel fails the call ("... holds NaN or Inf
  pixels") instead of giving meaningless features; values outside [0, 1] are used as given;
- encoded images are decoded by `data.images.decode_image`, one by one since their sizes
  differ, then follow the same rules;
- a batch of 0 images returns features [0, ...] on every signature (the network is not run).
Input errors fail the call with InvalidArgumentError and one message that names the signature
and what it expects: a wrong rank (images not [N, H, W, C], image_bytes not [N]), an empty
string, bytes that do not start like a JPEG, PNG, GIF, BMP or WebP file ("image 3 of the batch
is not ..."). A file whose header is right but whose data is corrupt fails with the decoder's
own message (e.g. "Invalid JPEG data or crop window").
The model's fixed preprocessing (Sobel, grayscale, high-pass) is one of its layers, so a
client sends plain images. Nothing exported calls back into Python (no `py_function`): the
SavedModel loads in any TensorFlow process, and in TensorFlow Serving.

Pooling, per endpoint: `models.pooling` (none, flatten, avg, max, maxKxL, avgKxL).

Defaults: the model's transfer endpoint (`models.TRANSFER_ENDPOINT`) with `max6x6` for
AlexNet's conv5 (13 x 13 x 256 -> 9216 features, the size of pool5 and of the conv5 probes
of the NAT paper's Table 3 protocol; K, L are capped by a smaller conv5 map) and `flatten`
for NiN's `sc` (the whole map, every cell's features; the SC loss itself compares the
averages of windows of that map, losses/spatial_contrasting.py); any other 4-D endpoint
defaults to `flatten` and a 2-D one to `none`.

`python -m serving.export --model_dir=DIR` exports the latest checkpoint of a training run (its
`config.json` gives the model); `--init=random --model=NAME` exports an untrained network,
seeded by --seed (with --model_dir: by the run's own seed, so that it is the run's random twin).
"""

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
from dataclasses import asdict, dataclass

from models import MODEL_NAMES, TRANSFER_ENDPOINT
from runtime import cli
from runtime.cli import UsageError, option
from runtime.errors import InvalidInput
from serving.graph import endpoint_shape, feature_module, input_size, output_shapes, signatures
from serving.signatures import INPUTS, METADATA_FILE

# TensorFlow loads after the flags are checked (runtime/cli.py).
tf = cli.lazy_import("tensorflow")
pooling_lib = cli.lazy_import("models.pooling")

PROGRAM = "serving.export"
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


def parse_endpoints(text: str) -> dict[str, str] | None:
    """"conv5:max6x6,embedding" -> {"conv5": "max6x6", "embedding": ""}; "" -> None."""
    if not text.strip():
        return None
    endpoints = {}
    for item in text.split(","):
        name, _, pooling = item.strip().partition(":")
        if not name:
            raise UsageError(f"--endpoints: empty endpoint name in {text!r}")
        if name in endpoints:
            raise UsageError(f"--endpoints: {name!r} listed twice in {text!r}")
        endpoints[name] = pooling
    return endpoints


# ----------------------------------------------------------------------------- binary


@dataclass(frozen=True)
class ExportConfig:
    """The flags of `python -m serving.export`."""

    model_dir: str = option("", "Training run: config.json and checkpoints.")
    init: str = option("checkpoint", "checkpoint: the latest checkpoint of --model_dir (or "
                       "--checkpoint); random: an untrained network of --model.",
                       choices=("checkpoint", "random"))
    model: str = option("", "Model name (with --init=random, or to override config.json).")
    model_kwargs: str = option("", "JSON keyword arguments of build_model (override "
                               "config.json's model_kwargs).")
    checkpoint: str = option("", "A checkpoint prefix or directory (default: the latest "
                             "checkpoint in --model_dir).")
    endpoints: str = option("", "Comma-separated endpoint[:pooling], pooling in none, "
                            "flatten, avg, max, maxKxL, avgKxL. Default: the transfer endpoint.")
    export_base: str = option("", "Base directory of the model server (default: "
                              "<model_dir>/export).")
    model_name: str = option("", "Served model name (default: the model name).")
    seed: int = option(0, "Seed of --init=random without a run (with --model_dir: the run's "
                       "own seed, its random twin).")

    def __post_init__(self):
        if self.init == "checkpoint" and not (self.model_dir or self.checkpoint):
            raise UsageError("--model_dir (or --checkpoint) is required unless --init=random "
                             "(see --help)")
        if self.init == "random" and self.checkpoint:
            raise UsageError("--checkpoint makes no sense with --init=random")
        if self.init == "random" and not (self.model or self.model_dir):
            raise UsageError("--init=random needs --model (or a --model_dir to read it from)")
        if self.model and self.model not in MODEL_NAMES:
            raise UsageError(f"--model={self.model}: choose one of {', '.join(MODEL_NAMES)}")
        if not self.export_base and not self.model_dir:
            raise UsageError("--export_base is required without --model_dir (see --help)")
        self.overrides()
        parse_endpoints(self.endpoints)

    def overrides(self) -> dict:
        """The --model_kwargs as a dict."""
        return cli.json_object("model_kwargs", self.model_kwargs)


def run(config: ExportConfig) -> str:
    """Build the model, load its weights, export; prints and returns the version directory."""
    from models.runs import load_run_model

    loaded = load_run_model(config.model_dir, config.model, config.overrides(),
                            config.checkpoint, config.init, seed=config.seed)
    metadata = {"model": loaded.name, "model_kwargs": loaded.kwargs,
                "checkpoint": loaded.checkpoint, "init": config.init,
                "export_flags": asdict(config)}
    if loaded.seed is not None:
        metadata["init_seed"] = loaded.seed
    for key in ("method", "dataset"):
        if key in loaded.config:
            metadata[key] = loaded.config[key]
    base = config.export_base or os.path.join(config.model_dir, "export")
    path = export_features(loaded.model, base, config.model_name or loaded.name,
                           parse_endpoints(config.endpoints), metadata, log=print)
    print(path)
    return path


def main(argv=None) -> None:
    cli.main(PROGRAM, ExportConfig, run, module_name=PROGRAM, doc=__doc__, argv=argv)


if __name__ == "__main__":
    main()
