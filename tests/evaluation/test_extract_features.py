"""Tests of the serving clients and evaluation/extract_features.py."""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format
from PIL import Image
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from evaluation import serving_client
from evaluation.extract_features import (
    extract,
    folder_items,
    list_images,
    read_index,
    tfds_items,
    write_outputs,
)
from evaluation.serving_client import (
    RestClient,
    SavedModelClient,
    ServingError,
    metadata_url,
    output_names_from_metadata,
    parse_response,
    predict_url,
    request_body,
)
from models import build_model
from train.export import export_features, pool_features

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 16
TOL = 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """nin_mnist (16x16x1) with two outputs: sc average-pooled and the NAT embedding."""
    model = build_model("nin_mnist", input_shape=(SIZE, SIZE, 1), head="nat", feature_dim=4)
    base = str(tmp_path_factory.mktemp("export"))
    path = export_features(model, base, "digits", {"sc": "avg", "embedding": "none"})
    return model, base, path


def _features(model, images):
    """The in-process oracle: float images [n, 16, 16, 1] in [0, 1] -> {output: features}."""
    out = model(tf.constant(images, tf.float32), training=False)
    return {"sc": pool_features(out["sc"], "avg").numpy(), "embedding": out["embedding"].numpy()}


def _decoded(path):
    """What the export should see for a file: RGB, channel mean, resized to 16x16, in [0, 1]."""
    with open(path, "rb") as f:
        return _decoded_blob(f.read())


def _decoded_blob(blob):
    rgb = tf.io.decode_image(blob, channels=3, expand_animations=False).numpy()
    grey = (rgb / np.float32(255)).mean(axis=-1, keepdims=True)
    if grey.shape[:2] != (SIZE, SIZE):
        grey = tf.image.resize(grey, (SIZE, SIZE), antialias=True).numpy()
    return grey


@pytest.fixture
def image_folder(tmp_path):
    """Good images (grey PNG, RGB PNG of another size, JPEG), a corrupt file and a dangling
    link, in two folders."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "b.PNG")
    (folder / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
        folder / "sub" / "d.jpg", quality=95)
    os.symlink(folder / "missing.png", folder / "sub" / "e.png")
    (folder / "notes.txt").write_text("not listed")
    return folder


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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rest_client_reports_an_unreachable_server():
    client = RestClient(f"127.0.0.1:{_free_port()}", "digits", timeout=5)
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


# ----------------------------------------------------------------------------- extraction

def test_list_images_is_sorted_and_recursive(image_folder):
    names = [os.path.relpath(p, image_folder) for p in list_images(str(image_folder))]
    assert names == ["a.png", "b.PNG", "c.png", os.path.join("sub", "d.jpg"),
                     os.path.join("sub", "e.png")]
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        list_images(str(image_folder / "absent"))


def test_extract_skips_bad_files_and_matches_the_model(exported, image_folder, tmp_path):
    model, _, path = exported
    client = SavedModelClient(path)
    assert client.output_names == ["embedding", "sc"]
    paths = list_images(str(image_folder))
    result = extract(client.predict_bytes, folder_items(paths), batch_size=2, progress=False)
    good = [p for p in paths if not p.endswith(("c.png", "e.png"))]
    assert result.index == good
    skipped = dict(result.skipped)
    assert sorted(skipped) == [str(image_folder / "c.png"), str(image_folder / "sub" / "e.png")]
    assert skipped[str(image_folder / "c.png")] == "Invalid PNG. Failed to initialize decoder."
    assert skipped[str(image_folder / "sub" / "e.png")].startswith("cannot read:")
    want = _features(model, np.stack([_decoded(p) for p in good]))
    for name in want:
        np.testing.assert_allclose(result.features[name], want[name], atol=TOL)
    written = write_outputs(result, str(tmp_path / "out"))
    assert sorted(os.path.basename(p) for p in written) == [
        "embedding.npy", "index.txt", "sc.npy", "skipped.txt"]
    assert read_index(str(tmp_path / "out")) == good
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "sc.npy"), result.features["sc"])
    lines = (tmp_path / "out" / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == sorted(skipped)


def test_saved_model_client_bad_input(exported):
    client = SavedModelClient(exported[2])
    with pytest.raises(ServingError, match=r"^assertion failed: .*1 \(grayscale\) or 3") as err:
        client.predict_images(np.zeros((1, SIZE, SIZE, 2), np.float32))
    assert err.value.bad_input
    with pytest.raises(ServingError, match="must be uint8 or float32"):
        client.predict_images(np.zeros((1, SIZE, SIZE, 1), np.int32))
    with pytest.raises(ServingError, match="cannot load a SavedModel"):
        SavedModelClient(os.path.join(exported[1], "absent"))


def test_tfds_source(exported):
    import tensorflow_datasets as tfds

    model, _, path = exported
    with tfds.testing.mock_data(num_examples=5):
        count, items = tfds_items("mnist", "test")
        items = list(items)
    assert [key for key, _ in items] == [f"tfds:mnist/test/{i}" for i in range(5)]
    assert count is None or count >= 5
    result = extract(SavedModelClient(path).predict_bytes, items, batch_size=4, progress=False)
    images = np.stack([_decoded_blob(blob) for _, blob in items])
    want = _features(model, images)
    np.testing.assert_allclose(result.features["sc"], want["sc"], atol=TOL)


def test_tfds_source_not_prepared(tmp_path):
    with pytest.raises(FileNotFoundError, match="--tfds mnist:test is not available in"):
        tfds_items("mnist", "test", str(tmp_path))


@pytest.mark.slow
def test_binary_writes_features(exported, image_folder, tmp_path):
    path = exported[2]
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "evaluation.extract_features", f"--images_dir={image_folder}",
         f"--saved_model={path}", f"--output_dir={out}", "--batch_size=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 images" in done.stdout and "2 skipped" in done.stdout
    index = read_index(str(out))
    assert len(index) == 3 and np.load(out / "sc.npy").shape == (3, 64)
    assert json.loads((out / "config.json").read_text())["batch_size"] == 3


# ----------------------------------------------------------------------------- live server

SERVER = shutil.which("tensorflow_model_server")


@pytest.mark.slow
@pytest.mark.skipif(SERVER is None, reason="tensorflow_model_server is not on PATH: the "
                    "end-to-end serving test needs a real TensorFlow Serving binary")
def test_live_tensorflow_serving(exported, image_folder, tmp_path):
    model, base, _ = exported
    rest, grpc_port = _free_port(), _free_port()
    server = subprocess.Popen(
        [SERVER, f"--port={grpc_port}", f"--rest_api_port={rest}", "--model_name=digits",
         f"--model_base_path={os.path.join(base, 'digits')}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = RestClient(f"127.0.0.1:{rest}", "digits", timeout=30)
        deadline = time.time() + 60
        while True:
            try:
                client.output_names("image_bytes")
                break
            except ServingError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        paths = list_images(str(image_folder))
        good = [p for p in paths if not p.endswith(("c.png", "e.png"))]
        want = _features(model, np.stack([_decoded(p) for p in good]))
        for columnar in (False, True):
            client.columnar = columnar
            result = extract(client.predict_bytes, folder_items(paths), 2, progress=False)
            rows = [result.index.index(p) for p in good]
            assert len(result.skipped) == 2
            for name in want:
                np.testing.assert_allclose(result.features[name][rows], want[name], atol=TOL)
        try:  # gRPC too, when tensorflow-serving-api is installed
            grpc_client = serving_client.GrpcClient(f"127.0.0.1:{grpc_port}", "digits")
        except ServingError:
            grpc_client = None
        if grpc_client is not None:
            result = extract(grpc_client.predict_bytes, folder_items(good), 2, progress=False)
            for name in want:
                np.testing.assert_allclose(result.features[name], want[name], atol=TOL)
    finally:
        server.terminate()
        server.wait(timeout=30)
