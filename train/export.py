"""SavedModel export of a feature extractor, in TensorFlow Serving's layout.

`export_features(model, export_base, model_name, endpoints)` writes

    <export_base>/<model_name>/<version>/        version = 1 + the largest integer already there
        saved_model.pb, variables/
        assets/features.json                     model, endpoints, input size, checkpoint, ...

The version directory is written under a hidden temporary name and renamed when complete, so a
model server polling `<export_base>/<model_name>` never loads a half-written version.

Signatures (every output is a dict {endpoint name: float32 feature tensor}):

    serving_default   images: float32 [N, H, W, C], values in [0, 1]
    serving_uint8     images: uint8   [N, H, W, C], values in [0, 255] (divided by 255)
    image_bytes       image_bytes: string [N], encoded JPEG / PNG / GIF / BMP files

The restored object also has `features(images)`, one function traced for both image dtypes,
and `metadata()`, the JSON of the asset as a string tensor.

Image convention (the zoo's): the model takes float32 images in [0, 1]. Inside the graph:
- uint8 is cast to float32 and divided by 255; float32 is taken as already in [0, 1];
- C must be 1 or 3, else the call fails with "images must have 1 (grayscale) or 3 (RGB)
  channels". A grey image is tiled to 3 channels for an RGB model; a colour image is
  averaged over its channels for a grey model (the rule of `models.layers.Grayscale`);
- images whose H, W differ from the model's input size are resized bilinearly with
  antialiasing (as `evaluation.datasets.resize_to_input`), without keeping the aspect ratio;
- encoded images are decoded to RGB (grey files tiled, the alpha channel dropped), one by one
  since their sizes differ, then follow the same rules. Bytes that are not an image fail the
  call with TensorFlow's "Unknown image file format" error.
The model's fixed preprocessing (Sobel, grayscale, high-pass) is one of its layers, so a
client sends plain images. Nothing exported calls back into Python (no `py_function`): the
SavedModel loads in any TensorFlow process, and in TensorFlow Serving.

Pooling, per endpoint (the output is always float32):

    none       the endpoint as it is: [N, h, w, c] or [N, d]
    flatten    [N, h * w * c]
    avg, max   global average / max over h, w: [N, c]
    maxKxL     adaptive max pooling to a K x L grid, flattened: [N, K * L * c]. Cell (i, j)
    avgKxL     covers rows floor(i h / K) .. ceil((i + 1) h / K) - 1 and the same for columns,
               so cells may overlap by one row or column when K does not divide h.

Defaults: the model's transfer endpoint (`models.TRANSFER_ENDPOINT`) with `max6x6` for
AlexNet's conv5 (13 x 13 x 256 -> 9216 features, the size of pool5 and of the conv5 probes
of the NAT paper's Table 3 protocol; K, L are capped by a smaller conv5 map) and `flatten`
for NiN's `sc` (the vectors the SC loss
compares); any other 4-D endpoint defaults to `flatten` and a 2-D one to `none`.

`python -m train.export --model_dir=DIR` exports the latest checkpoint of a training run (its
`config.json` gives the model); `--init=random --model=NAME` exports an untrained network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import keras
import tensorflow as tf

from models import TRANSFER_ENDPOINT, build_model
from models.weights import load_weights

METADATA_FILE = "features.json"
SIGNATURES = ("serving_default", "serving_uint8", "image_bytes")
BYTES_INPUT = "image_bytes"
IMAGES_INPUT = "images"
_GLOBAL_POOLINGS = ("none", "flatten", "avg", "max")
_ADAPTIVE = re.compile(r"^(max|avg)(\d+)x(\d+)$")
_DEFAULT_TRANSFER_POOLING = {"alexnet": "max6x6"}


def check_pooling(pooling: str, shape: tuple) -> None:
    """Raise ValueError unless `pooling` applies to an endpoint of shape (h, w, c) or (d,)."""
    match = _ADAPTIVE.match(pooling)
    if pooling not in _GLOBAL_POOLINGS and match is None:
        raise ValueError(f"unknown pooling {pooling!r}; choose none, flatten, avg, max, "
                         "maxKxL or avgKxL (adaptive pooling to a K x L grid)")
    if pooling in ("avg", "max") or match:
        if len(shape) != 3:
            raise ValueError(f"pooling {pooling!r} needs a feature map [h, w, c]; "
                             f"the endpoint has shape {tuple(shape)}")
    if match:
        cells = int(match.group(2)), int(match.group(3))
        if not 1 <= cells[0] <= shape[0] or not 1 <= cells[1] <= shape[1]:
            raise ValueError(f"pooling {pooling!r} needs 1 <= K <= {shape[0]} and "
                             f"1 <= L <= {shape[1]} for a {shape[0]}x{shape[1]} map")


def adaptive_bins(size: int, cells: int) -> list[tuple[int, int]]:
    """[(start, stop)] per cell i: floor(i size / cells), ceil((i + 1) size / cells)."""
    return [((i * size) // cells, -((-(i + 1) * size) // cells)) for i in range(cells)]


def pool_features(x: tf.Tensor, pooling: str) -> tf.Tensor:
    """Apply `pooling` (see the module docstring) to a batch of endpoint values; float32 out.

    Shapes other than the batch axis must be static (they are: the model input size is).
    """
    x = tf.cast(x, tf.float32)
    if pooling == "none":
        return x
    if pooling == "flatten":
        return tf.reshape(x, [-1, int(tf.reduce_prod(x.shape[1:]))])
    if pooling == "avg":
        return tf.reduce_mean(x, axis=[1, 2])
    if pooling == "max":
        return tf.reduce_max(x, axis=[1, 2])
    match = _ADAPTIVE.match(pooling)
    if match is None:
        raise ValueError(f"unknown pooling {pooling!r}")
    reduce = tf.reduce_max if match.group(1) == "max" else tf.reduce_mean
    rows = adaptive_bins(x.shape[1], int(match.group(2)))
    cols = adaptive_bins(x.shape[2], int(match.group(3)))
    cells = [reduce(x[:, r0:r1, c0:c1, :], axis=[1, 2]) for r0, r1 in rows for c0, c1 in cols]
    # [N, K * L, c] in row-major cell order, then flattened like `flatten` of a K x L x c map.
    return tf.reshape(tf.stack(cells, axis=1), [-1, len(rows) * len(cols) * x.shape[3]])


def default_endpoints(model: keras.Model, architecture: str | None = None) -> dict[str, str]:
    """{transfer endpoint: default pooling} for a model of the zoo."""
    architecture = architecture or model.name
    if architecture not in TRANSFER_ENDPOINT:
        raise ValueError(f"no default endpoint for model {architecture!r}; pass endpoints "
                         f"(known models: {', '.join(sorted(TRANSFER_ENDPOINT))})")
    endpoint = TRANSFER_ENDPOINT[architecture]
    return {endpoint: default_pooling(model, endpoint, architecture)}


def default_pooling(model: keras.Model, endpoint: str, architecture: str | None = None) -> str:
    """The pooling used when none is stated (see the module docstring)."""
    architecture = architecture or model.name
    shape = _endpoint_shape(model, endpoint)
    if TRANSFER_ENDPOINT.get(architecture) == endpoint:
        if architecture in _DEFAULT_TRANSFER_POOLING:
            # maxKxL, with K, L capped by a smaller map (conv5 of a small input).
            kind, rows, cols = _ADAPTIVE.match(_DEFAULT_TRANSFER_POOLING[architecture]).groups()
            return f"{kind}{min(int(rows), shape[0])}x{min(int(cols), shape[1])}"
    return "flatten" if len(shape) == 3 else "none"


def _endpoint_shape(model: keras.Model, endpoint: str) -> tuple:
    outputs = model.output
    if not isinstance(outputs, Mapping) or endpoint not in outputs:
        known = ", ".join(outputs) if isinstance(outputs, Mapping) else "none"
        raise ValueError(f"model {model.name} has no endpoint {endpoint!r}; endpoints: {known}")
    return tuple(outputs[endpoint].shape[1:])


def input_size(model: keras.Model) -> tuple[int, int, int]:
    """(H, W, C) of the model input; all three must be known."""
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or any(d is None for d in shape) or shape[-1] not in (1, 3):
        raise ValueError(f"export needs a model with a static input (H, W, 1 or 3); "
                         f"{model.name} has input shape {shape}")
    return shape


def output_shapes(model: keras.Model, endpoints: Mapping[str, str]) -> dict[str, list[int]]:
    """{endpoint: shape of one example's features after pooling}."""
    shapes = {}
    for endpoint, pooling in endpoints.items():
        shape = _endpoint_shape(model, endpoint)
        check_pooling(pooling, shape)
        probe = tf.zeros((1, *shape))
        shapes[endpoint] = list(pool_features(probe, pooling).shape[1:])
    return shapes


def _checked_images(images: tf.Tensor) -> tf.Tensor:
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


def _to_model_input(images: tf.Tensor, size: tuple[int, int, int]) -> tf.Tensor:
    """float32 [N, h, w, c] in [0, 1] -> [N, H, W, C]: channel rule, then resize if needed."""
    height, width, channels = size
    images = _checked_images(images)
    found = tf.shape(images)[-1]
    if channels == 3:
        images = tf.cond(tf.equal(found, 1), lambda: tf.tile(images, [1, 1, 1, 3]),
                         lambda: images)
    else:
        images = tf.reduce_mean(images, axis=-1, keepdims=True)
    images = tf.ensure_shape(images, [None, None, None, channels])
    same = tf.reduce_all(tf.equal(tf.shape(images)[1:3], [height, width]))
    # The identity branch keeps images already at the input size bit-exact.
    images = tf.cond(same, lambda: images,
                     lambda: tf.image.resize(images, (height, width), method="bilinear",
                                             antialias=True))
    return tf.ensure_shape(images, [None, height, width, channels])


def _decode_one(data: tf.Tensor, size: tuple[int, int, int]) -> tf.Tensor:
    """One encoded image -> float32 [H, W, 3] in [0, 1] at the model's H, W."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    image = tf.cast(image, tf.float32) / 255.0
    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], size[:2]))
    image = tf.cond(same, lambda: image,
                    lambda: tf.image.resize(image, size[:2], method="bilinear", antialias=True))
    return tf.ensure_shape(image, [size[0], size[1], 3])


class _FeatureExtractor(tf.Module):
    """The exported object: the model's variables, the signatures, and the metadata."""

    def __init__(self, model: keras.Model, endpoints: Mapping[str, str], metadata_json: str,
                 asset_path: str):
        super().__init__(name="feature_extractor")
        size = input_size(model)
        endpoints = dict(endpoints)
        self.metadata_asset = tf.saved_model.Asset(asset_path)

        def extract(images: tf.Tensor) -> dict[str, tf.Tensor]:
            outputs = model(_to_model_input(images, size), training=False)
            return {name: pool_features(outputs[name], pooling)
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

        def from_bytes(image_bytes):
            images = tf.map_fn(lambda data: _decode_one(data, size), image_bytes,
                               fn_output_signature=tf.TensorSpec([*size[:2], 3], tf.float32))
            return extract(images)

        image_spec = None  # [N, H, W, C], checked at run time (see _checked_images)
        self.serve_float = tf.function(from_float, input_signature=[
            tf.TensorSpec(image_spec, tf.float32, name=IMAGES_INPUT)])
        self.serve_uint8 = tf.function(from_uint8, input_signature=[
            tf.TensorSpec(image_spec, tf.uint8, name=IMAGES_INPUT)])
        self.serve_bytes = tf.function(from_bytes, input_signature=[
            tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
        self.features = tf.function(features)
        for dtype in (tf.float32, tf.uint8):
            self.features.get_concrete_function(tf.TensorSpec(image_spec, dtype))
        self.metadata = tf.function(lambda: tf.constant(metadata_json), input_signature=[])
        # Track the tf.Variables the traces capture (not the Keras variables that wrap them):
        # the graph-mode loader of saved_model_cli and TensorFlow Serving restores only
        # variables tracked as such, and fails with "Could not find variable" otherwise. The
        # Keras model itself stays in the closures and is not serialised.
        captured = {}
        for function in (self.serve_float, self.serve_uint8, self.serve_bytes):
            for variable in function.get_concrete_function().variables:
                captured.setdefault(id(variable), variable)
        self.model_variables = list(captured.values())

    def signatures(self) -> dict:
        return {"serving_default": self.serve_float, "serving_uint8": self.serve_uint8,
                "image_bytes": self.serve_bytes}


def next_version(model_base: str) -> int:
    """1 + the largest integer directory name in `model_base` (1 when there is none)."""
    if not tf.io.gfile.isdir(model_base):
        return 1
    versions = [int(name.rstrip("/")) for name in tf.io.gfile.listdir(model_base)
                if name.rstrip("/").isdigit()]
    return max(versions, default=0) + 1


def export_features(model: keras.Model, export_base: str, model_name: str,
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
        "signatures": {
            "serving_default": {IMAGES_INPUT: "float32 [N, H, W, C] in [0, 1]"},
            "serving_uint8": {IMAGES_INPUT: "uint8 [N, H, W, C]"},
            "image_bytes": {BYTES_INPUT: "string [N], encoded JPEG/PNG/GIF/BMP"},
        },
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
        module = _FeatureExtractor(model, endpoints, text, asset)
        tf.saved_model.save(module, staging, signatures=module.signatures())
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
            raise ValueError(f"empty endpoint name in {text!r}")
        if name in endpoints:
            raise ValueError(f"endpoint {name!r} listed twice in {text!r}")
        endpoints[name] = pooling
    return endpoints


# ----------------------------------------------------------------------------- binary

@dataclass(frozen=True)
class ExportConfig:
    """The flags of `python -m train.export`."""

    model_dir: str
    init: str
    model: str
    model_kwargs: str
    checkpoint: str
    endpoints: str
    export_base: str
    model_name: str


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("model_dir", "", "Training run: config.json and checkpoints.")
    flags.DEFINE_enum("init", "checkpoint", ["checkpoint", "random"],
                      "checkpoint: the latest checkpoint of --model_dir (or --checkpoint); "
                      "random: an untrained network of --model.")
    flags.DEFINE_string("model", "", "Model name (with --init=random, or to override "
                        "config.json).")
    flags.DEFINE_string("model_kwargs", "", "JSON keyword arguments of build_model (override "
                        "config.json's model_kwargs).")
    flags.DEFINE_string("checkpoint", "", "A checkpoint prefix or directory (default: the "
                        "latest checkpoint in --model_dir).")
    flags.DEFINE_string("endpoints", "", "Comma-separated endpoint[:pooling], pooling in none, "
                        "flatten, avg, max, maxKxL, avgKxL. Default: the transfer endpoint.")
    flags.DEFINE_string("export_base", "", "Base directory of the model server (default: "
                        "<model_dir>/export).")
    flags.DEFINE_string("model_name", "", "Served model name (default: the model name).")


def _config_from_flags() -> ExportConfig:
    from absl import app, flags

    f = flags.FLAGS
    if f.init == "checkpoint" and not (f.model_dir or f.checkpoint):
        raise app.UsageError("--model_dir (or --checkpoint) is required unless --init=random")
    if f.init == "random" and f.checkpoint:
        raise app.UsageError("--checkpoint makes no sense with --init=random")
    if not f.export_base and not f.model_dir:
        raise app.UsageError("--export_base is required without --model_dir")
    return ExportConfig(model_dir=f.model_dir, init=f.init, model=f.model,
                        model_kwargs=f.model_kwargs, checkpoint=f.checkpoint,
                        endpoints=f.endpoints, export_base=f.export_base,
                        model_name=f.model_name)


@dataclass(frozen=True)
class LoadedModel:
    """A model rebuilt from a training run: what `load_model` returns."""

    model: keras.Model
    name: str
    kwargs: dict
    checkpoint: str | None
    train_config: dict


def load_model(model_dir: str = "", model: str = "", model_kwargs: dict | None = None,
               checkpoint: str = "", init: str = "checkpoint") -> LoadedModel:
    """Rebuild a run's model from `<model_dir>/config.json` and load its latest checkpoint.

    `model` and `model_kwargs` override config.json; `checkpoint` (a prefix or directory)
    overrides the latest checkpoint of `model_dir`; init="random" loads nothing.
    Raises ValueError / FileNotFoundError with a one-line message.
    """
    train_config = {}
    config_path = os.path.join(model_dir, "config.json") if model_dir else ""
    if config_path and tf.io.gfile.exists(config_path):
        with tf.io.gfile.GFile(config_path) as f:
            train_config = json.load(f)
    elif model_dir and init == "checkpoint" and not model:
        raise FileNotFoundError(f"model_dir {model_dir} has no config.json (pass the model)")
    name = model or train_config.get("model", "")
    if not name:
        raise ValueError("no model name: config.json has none and none was given")
    kwargs = dict(train_config.get("model_kwargs", {}))
    kwargs.update(model_kwargs or {})
    if kwargs.get("input_shape") is not None:
        kwargs["input_shape"] = tuple(kwargs["input_shape"])
    built = build_model(name, **kwargs)
    loaded_from = None
    if init == "checkpoint":
        loaded_from = load_weights(built, checkpoint or model_dir).checkpoint
    return LoadedModel(built, name, kwargs, loaded_from, train_config)


def run(config: ExportConfig) -> str:
    """Build the model, load its weights, export; returns the version directory.

    Raises ValueError / FileNotFoundError with a one-line message on bad input.
    """
    try:
        overrides = json.loads(config.model_kwargs) if config.model_kwargs else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"--model_kwargs is not JSON: {err}") from None
    loaded = load_model(config.model_dir, config.model, overrides, config.checkpoint,
                        config.init)
    metadata = {"model": loaded.name, "model_kwargs": loaded.kwargs,
                "checkpoint": loaded.checkpoint, "init": config.init,
                "export_flags": asdict(config)}
    for key in ("method", "dataset"):
        if key in loaded.train_config:
            metadata[key] = loaded.train_config[key]
    base = config.export_base or os.path.join(config.model_dir, "export")
    return export_features(loaded.model, base, config.model_name or loaded.name,
                           parse_endpoints(config.endpoints), metadata)


def main(argv: list[str]) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _config_from_flags()
    try:
        path = run(config)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as err:
        print(f"export failed: {err}", file=sys.stderr)
        sys.exit(1)
    print(path)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
