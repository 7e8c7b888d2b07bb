"""Clients of an exported feature extractor (`serving.export`): in-process, REST and gRPC.

Every client maps a list of encoded images (JPEG/PNG/GIF/BMP/WebP file contents) to a dict
{output name: float32 [n, ...] features}, through the export's `image_bytes` signature
(input `image_bytes`, string [n]); `predict_images` sends decoded images [n, H, W, C] to
`serving_default` (float32 in [0, 1]) or `serving_uint8` instead. The in-process client is
also a frozen feature extractor for the probes: `client(images)` returns the endpoints of a
batch of float images as tensors, like a zoo model's dict of endpoints.

TensorFlow Serving's REST predict API (https://www.tensorflow.org/tfx/serving/api_rest):

    POST http://host:port/v1/models/<name>[/versions/<v>]:predict
    row format       {"signature_name": s, "instances": [<value of example 0>, ...]}
    columnar format  {"signature_name": s, "inputs": <value of the batch>}

With one named input, an instance is that input's value; binary strings are written
{"b64": "<base64>"}. The response is {"predictions": ...} (row) or {"outputs": ...} (columnar);
when the signature has ONE output its name is omitted (predictions is a list of values, outputs
the batch value), with several it is a list of {name: value} (row) or a {name: batch} object
(columnar). Errors come back as {"error": "<message>"} with an HTTP error status. The names
of the outputs are read once from `GET /v1/models/<name>[/versions/<v>]/metadata`.

gRPC uses `tensorflow_serving.apis` (package tensorflow-serving-api): PredictionService.Predict
with a PredictRequest whose inputs are TensorProtos.
"""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf

from serving.signatures import (
    BYTES_INPUT,
    BYTES_SIGNATURE,
    FLOAT_SIGNATURE,
    IMAGES_INPUT,
    METADATA_FILE,
    UINT8_SIGNATURE,
)


class ServingError(RuntimeError):
    """A request failed. `bad_input` is True when the server rejected the input itself."""

    def __init__(self, message: str, bad_input: bool = False):
        super().__init__(message)
        self.bad_input = bad_input


# ----------------------------------------------------------------------------- REST format

def predict_url(server: str, model_name: str, version: int | None = None) -> str:
    """`http://host:port/v1/models/<name>[/versions/<v>]:predict` (server: host:port or URL)."""
    return _model_url(server, model_name, version) + ":predict"


def metadata_url(server: str, model_name: str, version: int | None = None) -> str:
    """`http://host:port/v1/models/<name>[/versions/<v>]/metadata`."""
    return _model_url(server, model_name, version) + "/metadata"


def _model_url(server: str, model_name: str, version: int | None) -> str:
    base = server if server.startswith(("http://", "https://")) else f"http://{server}"
    url = f"{base.rstrip('/')}/v1/models/{model_name}"
    return url if version is None else f"{url}/versions/{int(version)}"


def _json_value(value):
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def request_body(inputs: Mapping[str, Sequence] | Sequence, signature_name: str,
                 columnar: bool = False) -> dict:
    """The JSON body of a predict request.

    Args:
      inputs: the batch of the single input (a list of bytes, or an array [n, ...]), or
        {input name: batch} for several inputs.
      signature_name: the signature to call.
      columnar: the "inputs" (columnar) format instead of "instances" (row).
    """
    body: dict = {"signature_name": signature_name}
    if isinstance(inputs, Mapping):
        if columnar:
            body["inputs"] = {name: [_json_value(v) for v in batch]
                              for name, batch in inputs.items()}
        else:
            sizes = {len(batch) for batch in inputs.values()}
            if len(sizes) != 1:
                raise ValueError("the row format needs inputs with the same batch size")
            names = list(inputs)
            body["instances"] = [{name: _json_value(inputs[name][i]) for name in names}
                                 for i in range(sizes.pop())]
    else:
        batch = [_json_value(v) for v in inputs]
        body["inputs" if columnar else "instances"] = batch
    return body


def parse_response(body: Mapping, output_names: Sequence[str]) -> dict[str, np.ndarray]:
    """{output name: float32 array} from a predict response (row or columnar).

    `output_names` are the signature's outputs; with one output the response omits its name.
    Raises ServingError for an {"error": ...} body or one that does not match the outputs.
    """
    if "error" in body:
        raise ServingError(f"server error: {body['error']}", bad_input=True)
    names = list(output_names)
    if "predictions" in body:
        rows = body["predictions"]
        if len(names) == 1 and not (rows and isinstance(rows[0], Mapping)):
            return {names[0]: np.asarray(rows, dtype=np.float32)}
        if not all(isinstance(row, Mapping) for row in rows):
            raise ServingError("predictions are not {name: value} objects for several outputs")
        missing = [name for name in names if rows and name not in rows[0]]
        if missing:
            raise ServingError(f"response lacks outputs {missing}")
        return {name: np.asarray([row[name] for row in rows], dtype=np.float32)
                for name in names}
    if "outputs" in body:
        outputs = body["outputs"]
        if len(names) == 1 and not isinstance(outputs, Mapping):
            return {names[0]: np.asarray(outputs, dtype=np.float32)}
        if not isinstance(outputs, Mapping) or any(name not in outputs for name in names):
            raise ServingError(f"outputs do not name {names}")
        return {name: np.asarray(outputs[name], dtype=np.float32) for name in names}
    raise ServingError(f"response has neither predictions nor outputs: keys {sorted(body)}")


def output_names_from_metadata(metadata: Mapping, signature_name: str) -> list[str]:
    """Sorted output names of `signature_name` in a GET .../metadata response."""
    try:
        defs = metadata["metadata"]["signature_def"]["signature_def"]
        return sorted(defs[signature_name]["outputs"])
    except (KeyError, TypeError):
        raise ServingError(f"model metadata has no signature {signature_name!r}") from None


# ----------------------------------------------------------------------------- clients

class SavedModelClient:
    """An export loaded in this process (`tf.saved_model.load`).

    Besides `predict_bytes` / `predict_images`, it is the frozen feature extractor of a
    SavedModel for the probes: `client(images)` maps float images [N, H, W, C] in [0, 1] (a
    tensor; inside a tf.function too) to {endpoint: float32 tensor} through
    `serving_default`, and `input_shape`, `name` and `endpoints` describe it like a model.
    """

    def __init__(self, path: str):
        self._tf = tf
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise ServingError(f"no saved_model.pb in {path}: not a SavedModel version folder")
        try:
            self._loaded = tf.saved_model.load(path)
        except OSError as err:
            raise ServingError(f"cannot load a SavedModel from {path}: {err}") from None
        self.signatures = dict(self._loaded.signatures)
        if BYTES_SIGNATURE not in self.signatures:
            raise ServingError(f"{path} has no {BYTES_SIGNATURE!r} signature: not an export "
                               "of serving.export")
        self.output_names = sorted(self.signatures[BYTES_SIGNATURE].structured_outputs)
        self.endpoints = tuple(self.output_names)
        metadata = os.path.join(path, "assets", METADATA_FILE)
        info = {}
        if os.path.exists(metadata):
            with open(metadata) as f:
                info = json.load(f)
        self.name = info.get("model_name") or os.path.basename(os.path.normpath(path))
        size = info.get("input_size")
        self.input_shape = (None, *size) if size else (None, None, None, None)

    def __call__(self, images, training: bool = False) -> dict:
        del training  # a SavedModel signature is always in inference mode
        x = self._tf.cast(images, self._tf.float32)
        return self.signatures[FLOAT_SIGNATURE](**{IMAGES_INPUT: x})

    def _call(self, signature: str, **inputs) -> dict[str, np.ndarray]:
        try:
            out = self.signatures[signature](**inputs)
        except self._tf.errors.InvalidArgumentError as err:
            line = _first_line(err.message)
            if not line.startswith(f"{signature}:"):  # a decoder's own message
                line = f"{signature}: {line}"
            raise ServingError(line, bad_input=True) from None
        return {name: value.numpy() for name, value in out.items()}

    def predict_bytes(self, images: Sequence[bytes]) -> dict[str, np.ndarray]:
        return self._call(BYTES_SIGNATURE,
                          **{BYTES_INPUT: self._tf.constant(list(images), self._tf.string)})

    def predict_images(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if images.dtype not in (np.uint8, np.float32):
            raise ServingError(f"images must be uint8 or float32; got {images.dtype}",
                               bad_input=True)
        signature = UINT8_SIGNATURE if images.dtype == np.uint8 else FLOAT_SIGNATURE
        return self._call(signature, **{IMAGES_INPUT: self._tf.constant(images)})


class RestClient:
    """TensorFlow Serving's REST predict API (see the module docstring)."""

    def __init__(self, server: str, model_name: str, version: int | None = None,
                 timeout: float = 120.0, columnar: bool = False):
        self.server, self.model_name, self.version = server, model_name, version
        self.timeout, self.columnar = timeout, columnar
        self._names: dict[str, list[str]] = {}

    def _request(self, url: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(url, data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            text = err.read().decode("utf-8", "replace")
            try:
                message = json.loads(text).get("error", text)
            except json.JSONDecodeError:
                message = text
            raise ServingError(f"HTTP {err.code} from {url}: {_first_line(message)}",
                               bad_input=err.code == 400) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ServingError(f"cannot reach TensorFlow Serving at {self.server}: "
                               f"{reason}") from None

    def output_names(self, signature: str) -> list[str]:
        if signature not in self._names:
            meta = self._request(metadata_url(self.server, self.model_name, self.version))
            self._names[signature] = output_names_from_metadata(meta, signature)
        return self._names[signature]

    def _predict(self, inputs, signature: str) -> dict[str, np.ndarray]:
        names = self.output_names(signature)
        body = request_body(inputs, signature, columnar=self.columnar)
        url = predict_url(self.server, self.model_name, self.version)
        return parse_response(self._request(url, body), names)

    def predict_bytes(self, images: Sequence[bytes]) -> dict[str, np.ndarray]:
        return self._predict(list(images), BYTES_SIGNATURE)

    def predict_images(self, images: np.ndarray) -> dict[str, np.ndarray]:
        signature = UINT8_SIGNATURE if images.dtype == np.uint8 else FLOAT_SIGNATURE
        return self._predict(images, signature)


def grpc_modules():
    """(predict_pb2, prediction_service_pb2_grpc, grpc), or ServingError naming the package."""
    try:
        # optional: tensorflow-serving-api (and grpc), for --grpc only
        import grpc
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    except ImportError:
        raise ServingError("--grpc needs the tensorflow-serving-api package "
                           "(pip install tensorflow-serving-api==2.21.0)") from None
    return predict_pb2, prediction_service_pb2_grpc, grpc


def grpc_request(model_name: str, signature: str, inputs: Mapping[str, np.ndarray],
                 version: int | None = None):
    """A PredictRequest for `model_name` / `signature` with {input name: array} as TensorProtos."""
    predict_pb2, _, _ = grpc_modules()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = int(version)
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


class GrpcClient:
    """TensorFlow Serving's gRPC PredictionService (port 8500 by default)."""

    def __init__(self, server: str, model_name: str, version: int | None = None,
                 timeout: float = 120.0):
        _, service, grpc = grpc_modules()
        self._grpc = grpc
        self.model_name, self.version, self.timeout = model_name, version, timeout
        self.server = server
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self._stub = service.PredictionServiceStub(grpc.insecure_channel(server, options))

    def _predict(self, signature: str, inputs: Mapping[str, np.ndarray]):
        request = grpc_request(self.model_name, signature, inputs, self.version)
        try:
            response = self._stub.Predict(request, timeout=self.timeout)
        except self._grpc.RpcError as err:
            code = err.code()
            raise ServingError(
                f"gRPC {code.name} from {self.server}: {_first_line(err.details() or '')}",
                bad_input=code == self._grpc.StatusCode.INVALID_ARGUMENT) from None
        return {name: tf.make_ndarray(proto).astype(np.float32)
                for name, proto in response.outputs.items()}

    def predict_bytes(self, images: Sequence[bytes]) -> dict[str, np.ndarray]:
        return self._predict(BYTES_SIGNATURE,
                             {BYTES_INPUT: np.array(list(images), dtype=object)})

    def predict_images(self, images: np.ndarray) -> dict[str, np.ndarray]:
        signature = UINT8_SIGNATURE if images.dtype == np.uint8 else FLOAT_SIGNATURE
        return self._predict(signature, {IMAGES_INPUT: images})


def _first_line(message: str) -> str:
    """The sentence of a TensorFlow error that says what is wrong: TensorFlow puts it after
    "Graph execution error:" and "Detected at node ..." lines, and wraps the export's own
    checks (serving/graph.py) as "assertion failed: [<message>]"."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(
        ("Graph execution error", "Detected at node", "<stack traces", "[[", "Improper call"))]
    line = (useful or lines or ["unknown error"])[0]
    line = re.sub(r"\s*\[(\[\{\{node|Op:).*$", "", line)  # where it happened: no use here
    if line.startswith("assertion failed: [") and line.endswith("]"):
        line = line[len("assertion failed: ["):-1]
    return line
