"""What an export runs: the signatures' input checks, the preprocessing and the features, as
one tf.Module (`feature_module`). serving/export.py states the contract, serving/export_lib.py
writes it.

Nothing here calls back into Python (no `py_function`): the graph loads in any TensorFlow
process, and in TensorFlow Serving.
"""

from __future__ import annotations

from collections.abc import Mapping

import tensorflow as tf

from data import images as data_images
from models import pooling as pooling_lib
from runtime.errors import InvalidInput
from serving.signatures import (
    BYTES_INPUT,
    BYTES_SIGNATURE,
    FLOAT_SIGNATURE,
    IMAGES_INPUT,
    INPUTS,
    UINT8_SIGNATURE,
)

# Leading bytes of the formats `data.images.decode_image` reads: (offset, bytes) that must all
# match. WebP is a RIFF file with "WEBP" at offset 8.
_MAGIC = {"JPEG": ((0, b"\xff\xd8\xff"),), "PNG": ((0, b"\x89PNG\r\n\x1a\n"),),
          "GIF": ((0, b"GIF8"),), "BMP": ((0, b"BM"),),
          "WebP": ((0, b"RIFF"), (8, b"WEBP"))}


def endpoint_shape(model, endpoint: str) -> tuple:
    """The shape of one example's `endpoint` (ValueError naming the known endpoints)."""
    outputs = model.output
    if not isinstance(outputs, Mapping) or endpoint not in outputs:
        known = ", ".join(outputs) if isinstance(outputs, Mapping) else "none"
        raise InvalidInput(f"model {model.name} has no endpoint {endpoint!r}; endpoints: {known}")
    return tuple(outputs[endpoint].shape[1:])


def input_size(model) -> tuple[int, int, int]:
    """(H, W, C) of the model input; all three must be known."""
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or any(d is None for d in shape) or shape[-1] not in (1, 3):
        raise InvalidInput(f"export needs a model with a static input (H, W, 1 or 3); "
                           f"{model.name} has input shape {shape}")
    return shape


def output_shapes(model, endpoints: Mapping[str, str]) -> dict[str, list[int]]:
    """{endpoint: shape of one example's features after pooling}."""
    shapes = {}
    for endpoint, pooling in endpoints.items():
        shape = endpoint_shape(model, endpoint)
        pooling_lib.check_pooling(pooling, shape)
        probe = tf.zeros((1, *shape))
        shapes[endpoint] = list(pooling_lib.pool_features(probe, pooling).shape[1:])
    return shapes


def _expected(signature: str) -> str:
    """What `signature` expects, for its error messages: "input <name>, <type and shape>"."""
    ((name, what),) = INPUTS[signature].items()
    return f"input {name}, {what}"


def _require(ok, template: str, *values):
    """Fail the call unless `ok`, with ONE message: `template` with `values` in its {}s
    (TensorFlow reports it as "assertion failed: [<message>]")."""
    message = tf.strings.format(template, values) \
        if values else template
    return tf.debugging.Assert(ok, [message])


def _checked_images(images, signature: str, expected: str):
    """`images` after run-time checks of rank 4 and of 1 or 3 channels (clear messages, naming
    `signature` and what it `expected`s).

    Restored signatures do not enforce their input shape, and a static rank in the signature
    would let graph optimisation fold a rank check away, so the image signatures declare an
    unknown shape and these checks run in the graph, before everything downstream.
    """
    shape = tf.shape(images)
    rank_ok = _require(tf.equal(tf.size(shape), 4),
                       f"{signature}: expected {expected} (rank 4); got shape {{}}", shape)
    with tf.control_dependencies([rank_ok]):
        channels = tf.shape(images)[-1]
        channels_ok = _require(
            tf.logical_or(tf.equal(channels, 1), tf.equal(channels, 3)),
            f"{signature}: images must have 1 (grayscale) or 3 (RGB) channels; got shape {{}}",
            shape)
    with tf.control_dependencies([channels_ok]):
        return tf.ensure_shape(tf.identity(images), [None, None, None, None])


def _first_failure(ok) -> tf.Tensor:
    """The position of the first False in a bool vector (its length when there is none)."""
    return tf.argmin(tf.concat([tf.cast(ok, tf.int32), [0]], 0), output_type=tf.int32)


def _checked_bytes(image_bytes):
    """`image_bytes` after run-time checks: a vector [N] of non-empty strings that start like a
    JPEG, PNG, GIF, BMP or WebP file."""
    expected = _expected(BYTES_SIGNATURE)
    shape = tf.shape(image_bytes)
    rank_ok = _require(tf.equal(tf.size(shape), 1),
                       f"{BYTES_SIGNATURE}: expected {expected}; got shape {{}}", shape)
    with tf.control_dependencies([rank_ok]):
        data = tf.reshape(image_bytes, [-1])
        full = tf.strings.length(data) > 0
        empty_ok = _require(tf.reduce_all(full), f"{BYTES_SIGNATURE}: image {{}} of the batch "
                            f"is an empty string; expected {expected}", _first_failure(full))
    with tf.control_dependencies([empty_ok]):
        padded = tf.strings.join([data, tf.constant(b"\0" * 12)])  # substr needs the bytes
        known = tf.zeros_like(full)
        for pieces in _MAGIC.values():
            match = tf.ones_like(full)
            for offset, magic in pieces:
                match &= tf.equal(tf.strings.substr(padded, offset, len(magic)), magic)
            known |= match
        format_ok = _require(tf.reduce_all(known), f"{BYTES_SIGNATURE}: image {{}} of the batch "
                             "is not a JPEG, PNG, GIF, BMP or WebP file; expected "
                             f"{expected}", _first_failure(known))
    with tf.control_dependencies([format_ok]):
        return tf.identity(data)


def feature_module(model, endpoints: Mapping[str, str], metadata_json: str, asset_path: str):
    """The exported tf.Module: the signatures, `features`, `metadata` and the variables."""
    size = input_size(model)
    endpoints = dict(endpoints)
    shapes = output_shapes(model, endpoints)
    module = tf.Module(name="feature_extractor")
    module.metadata_asset = tf.saved_model.Asset(asset_path)

    def extract(inputs):
        def run():
            outputs = model(inputs, training=False)
            return {name: pooling_lib.pool_features(outputs[name], pooling)
                    for name, pooling in endpoints.items()}

        def nothing():  # an empty batch: its features' shape is known without the network
            return {name: tf.zeros([0, *shapes[name]]) for name in endpoints}

        return tf.cond(tf.shape(inputs)[0] > 0, run, nothing)

    def from_float(images):
        images = _checked_images(images, FLOAT_SIGNATURE, _expected(FLOAT_SIGNATURE))
        finite = _require(tf.reduce_all(tf.math.is_finite(images)),
                          f"{FLOAT_SIGNATURE}: images holds NaN or Inf pixels; expected "
                          f"{_expected(FLOAT_SIGNATURE)}")
        with tf.control_dependencies([finite]):
            return extract(data_images.resize_to_input(tf.identity(images), size))

    def from_uint8(images):
        images = _checked_images(images, UINT8_SIGNATURE, _expected(UINT8_SIGNATURE))
        return extract(data_images.resize_to_input(tf.cast(images, tf.float32) / 255.0, size))

    def features(images):
        if images.dtype not in (tf.uint8, tf.float32):
            raise TypeError(f"images must be uint8 or float32; got {images.dtype.name}")
        return (from_uint8 if images.dtype == tf.uint8 else from_float)(images)

    def decode_one(data):
        image = data_images.resize_to_input(data_images.decode_image(data), (*size[:2], 3))
        return tf.ensure_shape(image, [size[0], size[1], 3])

    def from_bytes(image_bytes):
        images = tf.map_fn(decode_one, _checked_bytes(image_bytes),
                           fn_output_signature=tf.TensorSpec([*size[:2], 3], tf.float32))
        return extract(data_images.resize_to_input(images, size))

    # Shapes are checked at run time (see _checked_images), so no input declares a rank.
    image_spec = None  # [N, H, W, C]
    module.serve_float = tf.function(from_float, input_signature=[
        tf.TensorSpec(image_spec, tf.float32, name=IMAGES_INPUT)])
    module.serve_uint8 = tf.function(from_uint8, input_signature=[
        tf.TensorSpec(image_spec, tf.uint8, name=IMAGES_INPUT)])
    module.serve_bytes = tf.function(from_bytes, input_signature=[
        tf.TensorSpec(None, tf.string, name=BYTES_INPUT)])  # [N]
    module.features = tf.function(features)
    for dtype in (tf.float32, tf.uint8):
        module.features.get_concrete_function(tf.TensorSpec(image_spec, dtype))
    module.metadata = tf.function(lambda: tf.constant(metadata_json), input_signature=[])
    module.model_variables = _captured_variables(module)
    return module


def _captured_variables(module) -> list:
    """The tf.Variables the signatures capture, to be tracked by the module.

    Tracked are these (not the Keras variables that wrap them): the graph-mode loader of
    saved_model_cli and TensorFlow Serving restores only variables tracked as such, and fails
    with "Could not find variable" otherwise. The Keras model itself stays in the closures and
    is not serialised. They come in name order: the traces list their captures in no fixed
    order, and a fixed one makes two exports of the same weights bitwise equal.
    """
    captured = {}
    for function in (module.serve_float, module.serve_uint8, module.serve_bytes):
        for variable in function.get_concrete_function().variables:
            captured.setdefault(id(variable), variable)
    return sorted(captured.values(), key=lambda variable: variable.name)


def signatures(module) -> dict:
    return {FLOAT_SIGNATURE: module.serve_float, UINT8_SIGNATURE: module.serve_uint8,
            BYTES_SIGNATURE: module.serve_bytes}
