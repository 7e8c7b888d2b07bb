"""serving/extract_features.py and extract_features_lib.py: extraction through a client, skips,
outputs, the binary."""

import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest

from data.images import list_images
from serving import client as serving_client
from serving.client import RestClient, SavedModelClient, ServingError
from serving.extract_features_lib import (
    extract,
    folder_items,
    read_index,
    tfds_items,
    write_outputs,
)
from tests.helpers import TOL, decoded, decoded_blob, features_of, free_ports, run_module

# ----------------------------------------------------------------------------- extraction

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
    assert skipped[str(image_folder / "c.png")] == ("image_bytes: Invalid PNG. Failed to "
                                                    "initialize decoder.")
    assert skipped[str(image_folder / "sub" / "e.png")].startswith("cannot read:")
    want = features_of(model, np.stack([decoded(p) for p in good]))
    for name in want:
        np.testing.assert_allclose(result.features[name], want[name], atol=TOL)
    written = write_outputs(result, str(tmp_path / "out"))
    assert sorted(os.path.basename(p) for p in written) == [
        "embedding.npy", "index.txt", "sc.npy", "skipped.txt"]
    assert read_index(str(tmp_path / "out")) == good
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "sc.npy"), result.features["sc"])
    lines = (tmp_path / "out" / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == sorted(skipped)


def test_tfds_source(exported):
    import tensorflow_datasets as tfds

    model, _, path = exported
    with tfds.testing.mock_data(num_examples=5):
        count, items = tfds_items("mnist", "test")
        items = list(items)
    assert [key for key, _ in items] == [f"tfds:mnist/test/{i}" for i in range(5)]
    assert count is None or count >= 5
    result = extract(SavedModelClient(path).predict_bytes, items, batch_size=4, progress=False)
    images = np.stack([decoded_blob(blob) for _, blob in items])
    want = features_of(model, images)
    np.testing.assert_allclose(result.features["sc"], want["sc"], atol=TOL)


def test_tfds_source_not_prepared(tmp_path):
    with pytest.raises(FileNotFoundError, match="--tfds mnist:test is not available in"):
        tfds_items("mnist", "test", str(tmp_path))


@pytest.mark.slow
def test_binary_writes_features(exported, image_folder, tmp_path):
    path = exported[2]
    out = tmp_path / "out"
    done = run_module("serving.extract_features", f"--images_dir={image_folder}",
                      f"--saved_model={path}", f"--output_dir={out}", "--batch_size=3",
                      timeout=300)
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
    rest, grpc_port = free_ports(2)
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
        want = features_of(model, np.stack([decoded(p) for p in good]))
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


def test_nothing_usable_is_a_one_line_failure_with_the_reasons(exported, tmp_path, capsys):
    from serving import extract_features as binary

    folder, out = tmp_path / "bad", tmp_path / "out"
    folder.mkdir()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "text.png").write_bytes(b"hello")
    with pytest.raises(SystemExit) as exit_info:
        binary.main(["extract_features", f"--images_dir={folder}",
                     f"--saved_model={exported[2]}", f"--output_dir={out}"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "serving.extract_features: error: no image could be used: all 3 were skipped, each "
        f"with its reason in {out}/skipped.txt"]
    expected = "expected input image_bytes, string [N], encoded JPEG/PNG/GIF/BMP/WebP"
    assert (out / "skipped.txt").read_text().splitlines() == [
        f"{folder}/empty.jpg\timage_bytes: image 0 of the batch is an empty string; {expected}",
        f"{folder}/text.png\timage_bytes: image 0 of the batch is not a JPEG, PNG, GIF, BMP "
        f"or WebP file; {expected}",
        f"{folder}/truncated.png\timage_bytes: Invalid PNG. Failed to initialize decoder."]
    (tmp_path / "none").mkdir()
    with pytest.raises(SystemExit):
        binary.main(["extract_features", f"--images_dir={tmp_path / 'none'}",
                     f"--saved_model={exported[2]}", f"--output_dir={out}"])
    assert capsys.readouterr().err.startswith(
        f"serving.extract_features: error: --images_dir={tmp_path / 'none'} holds no image "
        "file (.jpg, .jpeg, .png")
