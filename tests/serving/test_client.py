"""The serving clients: TF Serving's REST format, gRPC requests, the in-process client."""

import base64
import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from serving import client as serving_client
from serving.client import (
    RestClient,
    SavedModelClient,
    ServingError,
    metadata_url,
    output_names_from_metadata,
    parse_response,
    predict_url,
    request_body,
)
from tests.helpers import SIZE, free_ports

# ----------------------------------------------------------------------------- REST format

def test_urls():
    assert predict_url("localhost:8501", "nin") == "http://localhost:8501/v1/models/nin:predict"
    assert (predict_url("http://h:1/", "nin", 3)
            == "http://h:1/v1/models/nin/versions/3:predict")
    assert metadata_url("h:2", "nin") == "http://h:2/v1/models/nin/metadata"


def test_request_bodies_follow_the_documented_format():
    blobs = [b"\x89PNG\x00\xff", b"jpeg bytes"]
    b64 = [base64.b64encode(b).decode() for b in blobs]
    # One named input, row format: instances are the input's values, binary as {"b64": ...}.
    assert request_body(blobs, "image_bytes") == {
        "signature_name": "image_bytes", "instances": [{"b64": b64[0]}, {"b64": b64[1]}]}
    assert request_body(blobs, "image_bytes", columnar=True) == {
        "signature_name": "image_bytes", "inputs": [{"b64": b64[0]}, {"b64": b64[1]}]}
    images = np.arange(8, dtype=np.uint8).reshape(2, 2, 2, 1)
    body = request_body(images, "serving_uint8")
    assert body["instances"] == [[[[0], [1]], [[2], [3]]], [[[4], [5]], [[6], [7]]]]
    # Several named inputs: one object per instance (row) or per input (columnar).
    assert request_body({"a": [1, 2], "b": [b"x", b"y"]}, "s")["instances"] == [
        {"a": 1, "b": {"b64": "eA=="}}, {"a": 2, "b": {"b64": "eQ=="}}]
    assert request_body({"a": [1, 2], "b": [b"x", b"y"]}, "s", columnar=True)["inputs"] == {
        "a": [1, 2], "b": [{"b64": "eA=="}, {"b64": "eQ=="}]}
    with pytest.raises(ValueError, match="same batch size"):
        request_body({"a": [1, 2], "b": [3]}, "s")
    # The body is plain JSON.
    assert json.loads(json.dumps(body)) == body


def test_parse_responses_in_every_documented_shape():
    rows = [[0.5, 1.0], [2.0, 3.0]]
    # One output: its name is omitted.
    got = parse_response({"predictions": rows}, ["sc"])
    np.testing.assert_array_equal(got["sc"], np.array(rows, np.float32))
    assert got["sc"].dtype == np.float32
    np.testing.assert_array_equal(parse_response({"outputs": rows}, ["sc"])["sc"], rows)
    # Several outputs: a list of objects (row) or one object (columnar).
    two = parse_response({"predictions": [{"sc": [1.0], "embedding": [0.0, 1.0]},
                                          {"sc": [2.0], "embedding": [1.0, 0.0]}]},
                         ["embedding", "sc"])
    np.testing.assert_array_equal(two["sc"], [[1.0], [2.0]])
    np.testing.assert_array_equal(two["embedding"], [[0.0, 1.0], [1.0, 0.0]])
    col = parse_response({"outputs": {"sc": [[1.0]], "embedding": [[0.0, 1.0]]}},
                         ["embedding", "sc"])
    np.testing.assert_array_equal(col["embedding"], [[0.0, 1.0]])
    with pytest.raises(ServingError, match="server error: Unknown image") as err:
        parse_response({"error": "Unknown image file format"}, ["sc"])
    assert err.value.bad_input
    with pytest.raises(ServingError, match="lacks outputs"):
        parse_response({"predictions": [{"sc": [1.0]}]}, ["embedding", "sc"])
    with pytest.raises(ServingError, match="neither predictions nor outputs"):
        parse_response({"result": []}, ["sc"])


def test_output_names_from_the_servers_metadata(exported):
    # The metadata API returns GetModelMetadataResponse in proto3 JSON; build it from the real
    # export's SignatureDefs with protobuf's own JSON mapping.
    _, _, path = exported
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    signature_map = {"signature_def": {
        name: json_format.MessageToDict(sig, preserving_proto_field_name=True)
        for name, sig in proto.meta_graphs[0].signature_def.items()}}
    assert isinstance(proto.meta_graphs[0].signature_def["image_bytes"],
                      meta_graph_pb2.SignatureDef)
    response = {"model_spec": {"name": "digits", "signature_name": "", "version": "1"},
                "metadata": {"signature_def": signature_map}}
    assert output_names_from_metadata(response, "image_bytes") == ["embedding", "sc"]
    assert output_names_from_metadata(response, "serving_default") == ["embedding", "sc"]
    with pytest.raises(ServingError, match="no signature 'classify'"):
        output_names_from_metadata(response, "classify")


def test_rest_client_reports_an_unreachable_server():
    client = RestClient(f"127.0.0.1:{free_ports()[0]}", "digits", timeout=5)
    with pytest.raises(ServingError, match=r"cannot reach TensorFlow Serving at 127\.0") as err:
        client.predict_bytes([b"x"])
    assert not err.value.bad_input


# ----------------------------------------------------------------------------- gRPC

def test_grpc_without_the_package_fails_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_serving", None)
    monkeypatch.setitem(sys.modules, "tensorflow_serving.apis", None)
    with pytest.raises(ServingError, match=r"^--grpc needs the tensorflow-serving-api package"):
        serving_client.GrpcClient("localhost:8500", "digits")


def test_grpc_request_proto():
    pytest.importorskip("tensorflow_serving.apis",
                        reason="tensorflow-serving-api is not installed")
    request = serving_client.grpc_request(
        "digits", "image_bytes", {"image_bytes": np.array([b"a", b"bc"], dtype=object)}, 3)
    assert request.model_spec.name == "digits"
    assert request.model_spec.signature_name == "image_bytes"
    assert request.model_spec.version.value == 3
    tensor = request.inputs["image_bytes"]
    assert tensor.dtype == tf.string.as_datatype_enum
    assert [d.size for d in tensor.tensor_shape.dim] == [2]
    assert list(tensor.string_val) == [b"a", b"bc"]


def test_saved_model_client_bad_input(exported):
    client = SavedModelClient(exported[2])
    with pytest.raises(ServingError) as err:
        client.predict_images(np.zeros((1, SIZE, SIZE, 2), np.float32))
    assert str(err.value) == ("serving_default: images must have 1 (grayscale) or 3 (RGB) "
                              f"channels; got shape [1 {SIZE} {SIZE} 2]")
    assert err.value.bad_input
    # A decoder's own message is named after the signature too, without TensorFlow's frame.
    with pytest.raises(ServingError) as err:
        client.predict_bytes([b"\x89PNG\r\n\x1a\n but no image"])
    assert str(err.value) == "image_bytes: Invalid PNG. Failed to initialize decoder."
    with pytest.raises(ServingError, match="must be uint8 or float32"):
        client.predict_images(np.zeros((1, SIZE, SIZE, 1), np.int32))
    with pytest.raises(ServingError, match=r"no saved_model\.pb in .*: not a SavedModel version"):
        SavedModelClient(os.path.join(exported[1], "absent"))
