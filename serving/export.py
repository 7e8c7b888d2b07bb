"""SavedModel export of a feature extractor, in TensorFlow Serving's layout.

`export_features(model, export_base, model_name, endpoints)` writes

    <export_base>/<model_name>/<version>/        version = 1 + the largest integer already there
        saved_model.pb, variables/
        assets/features.json                     model, endpoints, input size, checkpoint, ...

The version directory is written under a hidden temporary name and renamed when complete, so a
model server polling `<export_base>/<model_name>` never loads a half-written version.

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
- encoded images are decoded by `data.images.decode_image`, one by one since their sizes
  differ, then follow the same rules. Bytes that are not an image fail the call with
  TensorFlow's "Unknown image file format" error.
The model's fixed preprocessing (Sobel, grayscale, high-pass) is one of its layers, so a
client sends plain images. Nothing exported calls back into Python (no `py_function`): the
SavedModel loads in any TensorFlow process, and in TensorFlow Serving.

Pooling, per endpoint: `models.pooling` (none, flatten, avg, max, maxKxL, avgKxL).

Defaults: the model's transfer endpoint (`models.TRANSFER_ENDPOINT`) with `max6x6` for
AlexNet's conv5 (13 x 13 x 256 -> 9216 features, the size of pool5 and of the conv5 probes
of the NAT paper's Table 3 protocol; K, L are capped by a smaller conv5 map) and `flatten`
for NiN's `sc` (the vectors the SC loss
compares); any other 4-D endpoint defaults to `flatten` and a 2-D one to `none`.

`python -m serving.export --model_dir=DIR` exports the latest checkpoint of a training run (its
`config.json` gives the model); `--init=random --model=NAME` exports an untrained network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from models import MODEL_NAMES, TRANSFER_ENDPOINT, cli
from models.cli import UsageError, option
from serving.signatures import (
    BYTES_INPUT,
    BYTES_SIGNATURE,
    FLOAT_SIGNATURE,
    IMAGES_INPUT,
    INPUTS,
    METADATA_FILE,
    UINT8_SIGNATURE,
)

# TensorFlow loads after the flags are checked (models/cli.py).
tf = cli.lazy_import("tensorflow")
data_images = cli.lazy_import("data.images")
pooling_lib = cli.lazy_import("models.pooling")

PROGRAM = "serving.export"
_DEFAULT_TRANSFER_POOLING = {"alexnet": ("max", 6, 6)}


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
    shape = _endpoint_shape(model, endpoint)
    if TRANSFER_ENDPOINT.get(architecture) == endpoint and architecture in \
            _DEFAULT_TRANSFER_POOLING:
        # maxKxL, with K, L capped by a smaller map (conv5 of a small input).
        mode, rows, cols = _DEFAULT_TRANSFER_POOLING[architecture]
        return pooling_lib.adaptive(mode, min(rows, shape[0]), min(cols, shape[1]))
    return "flatten" if len(shape) == 3 else "none"


def _endpoint_shape(model, endpoint: str) -> tuple:
    outputs = model.output
    if not isinstance(outputs, Mapping) or endpoint not in outputs:
        known = ", ".join(outputs) if isinstance(outputs, Mapping) else "none"
        raise ValueError(f"model {model.name} has no endpoint {endpoint!r}; endpoints: {known}")
    return tuple(outputs[endpoint].shape[1:])


def input_size(model) -> tuple[int, int, int]:
    """(H, W, C) of the model input; all three must be known."""
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or any(d is None for d in shape) or shape[-1] not in (1, 3):
        raise ValueError(f"export needs a model with a static input (H, W, 1 or 3); "
                         f"{model.name} has input shape {shape}")
    return shape


def output_shapes(model, endpoints: Mapping[str, str]) -> dict[str, list[int]]:
    """{endpoint: shape of one example's features after pooling}."""
    shapes = {}
    for endpoint, pooling in endpoints.items():
        shape = _endpoint_shape(model, endpoint)
        pooling_lib.check_pooling(pooling, shape)
        probe = tf.zeros((1, *shape))
        shapes[endpoint] = list(pooling_lib.pool_features(probe, pooling).shape[1:])
    return shapes


def _checked_images(images):
    """`images` after run-time checks of rank 4 and of 1 or 3 channels (clear messages).

    Restored signatures do not enforce their input shape, and a static rank in the signature
    would let graph optimisation fold a rank check away, so the image signatures declare an
    unknown shape and these checks run in the graph, before everything downstream.
    """
    shape = tf.shape(images)
    rank_ok = tf.debugging.Assert(
        tf.equal(tf.size(shape), 4),
        ["images must be a batch [N, H, W, C] (rank 4); got shape", shape])
    with tf.control_dependencies([rank_ok]):
        channels = tf.shape(images)[-1]
        channels_ok = tf.debugging.Assert(
            tf.logical_or(tf.equal(channels, 1), tf.equal(channels, 3)),
            ["images must have 1 (grayscale) or 3 (RGB) channels; got shape", shape])
    with tf.control_dependencies([channels_ok]):
        return tf.ensure_shape(tf.identity(images), [None, None, None, None])


def _feature_module(model, endpoints: Mapping[str, str], metadata_json: str, asset_path: str):
    """The exported tf.Module: the signatures, `features`, `metadata` and the variables."""
    size = input_size(model)
    endpoints = dict(endpoints)
    module = tf.Module(name="feature_extractor")
    module.metadata_asset = tf.saved_model.Asset(asset_path)

    def extract(images):
        inputs = data_images.resize_to_input(_checked_images(images), size)
        outputs = model(inputs, training=False)
        return {name: pooling_lib.pool_features(outputs[name], pooling)
                for name, pooling in endpoints.items()}

    def from_float(images):
        return extract(tf.cast(images, tf.float32))

    def from_uint8(images):
        return extract(tf.cast(images, tf.float32) / 255.0)

    def features(images):
        if images.dtype == tf.uint8:
            return from_uint8(images)
        if images.dtype == tf.float32:
            return from_float(images)
        raise TypeError(f"images must be uint8 or float32; got {images.dtype.name}")

    def decode_one(data):
        image = data_images.resize_to_input(data_images.decode_image(data), (*size[:2], 3))
        return tf.ensure_shape(image, [size[0], size[1], 3])

    def from_bytes(image_bytes):
        images = tf.map_fn(decode_one, image_bytes,
                           fn_output_signature=tf.TensorSpec([*size[:2], 3], tf.float32))
        return extract(images)

    image_spec = None  # [N, H, W, C], checked at run time (see _checked_images)
    module.serve_float = tf.function(from_float, input_signature=[
        tf.TensorSpec(image_spec, tf.float32, name=IMAGES_INPUT)])
    module.serve_uint8 = tf.function(from_uint8, input_signature=[
        tf.TensorSpec(image_spec, tf.uint8, name=IMAGES_INPUT)])
    module.serve_bytes = tf.function(from_bytes, input_signature=[
        tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
    module.features = tf.function(features)
    for dtype in (tf.float32, tf.uint8):
        module.features.get_concrete_function(tf.TensorSpec(image_spec, dtype))
    module.metadata = tf.function(lambda: tf.constant(metadata_json), input_signature=[])
    # Track the tf.Variables the traces capture (not the Keras variables that wrap them): the
    # graph-mode loader of saved_model_cli and TensorFlow Serving restores only variables
    # tracked as such, and fails with "Could not find variable" otherwise. The Keras model
    # itself stays in the closures and is not serialised.
    captured = {}
    for function in (module.serve_float, module.serve_uint8, module.serve_bytes):
        for variable in function.get_concrete_function().variables:
            captured.setdefault(id(variable), variable)
    module.model_variables = list(captured.values())
    return module


def _signatures(module) -> dict:
    return {FLOAT_SIGNATURE: module.serve_float, UINT8_SIGNATURE: module.serve_uint8,
            BYTES_SIGNATURE: module.serve_bytes}


def next_version(model_base: str) -> int:
    """1 + the largest integer directory name in `model_base` (1 when there is none)."""
    if not tf.io.gfile.isdir(model_base):
        return 1
    versions = [int(name.rstrip("/")) for name in tf.io.gfile.listdir(model_base)
                if name.rstrip("/").isdigit()]
    return max(versions, default=0) + 1


def export_features(model, export_base: str, model_name: str,
                    endpoints: dict[str, str] | None = None,
                    metadata: dict | None = None) -> str:
    """Write the feature extractor of `model` as `<export_base>/<model_name>/<version>/`.

    Args:
      model: a zoo model (output: a dict of endpoints; static input [H, W, 1 or 3]).
      export_base: the model server's base directory.
      model_name: the name the server serves it under ([A-Za-z0-9_.-]+).
      endpoints: {endpoint: pooling}; None means the model's transfer endpoint with its default
        pooling. A pooling of None or "" also takes the default.
      metadata: extra JSON-serialisable facts for the asset (for example "checkpoint",
        "model_kwargs"); "model" names the architecture when `model.name` is not one.

    Returns:
      The version directory written.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", model_name or ""):
        raise ValueError(f"model_name must match [A-Za-z0-9_.-]+; got {model_name!r}")
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

    info = {
        "model_name": model_name,
        "model": architecture,
        "input_size": list(size),
        "endpoints": {name: {"pooling": pooling, "shape": shapes[name]}
                      for name, pooling in endpoints.items()},
        "signatures": INPUTS,
        "checkpoint": metadata.pop("checkpoint", None),
        **{k: v for k, v in metadata.items() if k != "model"},
    }
    text = json.dumps(info, indent=2, sort_keys=True)

    model_base = os.path.join(export_base, model_name)
    tf.io.gfile.makedirs(model_base)
    version = next_version(model_base)
    final = os.path.join(model_base, str(version))
    staging = os.path.join(model_base, f".tmp-{version}-{os.getpid()}")
    with tempfile.TemporaryDirectory() as scratch:
        asset = os.path.join(scratch, METADATA_FILE)
        with open(asset, "w") as f:
            f.write(text + "\n")
        module = _feature_module(model, endpoints, text, asset)
        tf.saved_model.save(module, staging, signatures=_signatures(module))
    if tf.io.gfile.exists(final):  # another export took this version meanwhile
        shutil.rmtree(staging, ignore_errors=True)
        raise FileExistsError(f"export version {final} appeared while writing; retry")
    tf.io.gfile.rename(staging, final)
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
                            config.checkpoint, config.init)
    metadata = {"model": loaded.name, "model_kwargs": loaded.kwargs,
                "checkpoint": loaded.checkpoint, "init": config.init,
                "export_flags": asdict(config)}
    for key in ("method", "dataset"):
        if key in loaded.config:
            metadata[key] = loaded.config[key]
    base = config.export_base or os.path.join(config.model_dir, "export")
    path = export_features(loaded.model, base, config.model_name or loaded.name,
                           parse_endpoints(config.endpoints), metadata)
    print(path)
    return path


def main(argv=None) -> None:
    cli.main(PROGRAM, ExportConfig, run, module_name=PROGRAM, doc=__doc__, argv=argv)


if __name__ == "__main__":
    main()
