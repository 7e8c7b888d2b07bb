"""serving/export.py: layout, signatures, bad input, consumers, the binary."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from models import build_model
from models.cli import UsageError
from models.pooling import pool_features
from models.precision import float32_copy
from serving.export import (
    ExportConfig,
    default_endpoints,
    default_pooling,
    export_features,
    next_version,
    parse_endpoints,
    read_metadata,
    run,
)
from tests.helpers import make_run_dir, run_module

TOL = 1e-5


def _randomise_statistics(model, seed):
    """Give BN moving statistics non-default values, so that a lost variable shows."""
    rng = np.random.default_rng(seed)
    for variable in model.non_trainable_variables:
        if "moving_mean" in variable.path:
            variable.assign(rng.normal(0, 0.1, variable.shape).astype("float32"))
        elif "moving_variance" in variable.path:
            variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    """nin_mnist (16x16x1, NAT head) exported with two endpoints."""
    model = build_model("nin_mnist", input_shape=(16, 16, 1), head="nat", feature_dim=8)
    _randomise_statistics(model, 0)
    base = str(tmp_path_factory.mktemp("grey"))
    path = export_features(model, base, "digits", {"sc": "max2x2", "embedding": "none"},
                           {"checkpoint": "/runs/x/ckpt-7", "method": "nat"})
    return model, path, tf.saved_model.load(path)


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    """nin_cifar10 (16x16x3, no head) exported with its default endpoint."""
    model = build_model("nin_cifar10", input_shape=(16, 16, 3), head="none")
    _randomise_statistics(model, 1)
    base = str(tmp_path_factory.mktemp("rgb"))
    path = export_features(model, base, "cifar")
    return model, path, tf.saved_model.load(path)


def _expected(model, images, endpoints):
    out = model(tf.constant(images, tf.float32), training=False)
    return {name: pool_features(out[name], pooling).numpy() for name, pooling in endpoints}


def _images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def test_parse_endpoints():
    assert parse_endpoints("") is None
    assert parse_endpoints("conv5:max6x6, embedding") == {"conv5": "max6x6", "embedding": ""}
    with pytest.raises(ValueError, match="listed twice"):
        parse_endpoints("sc,sc:avg")


def test_default_endpoints():
    nin = build_model("nin_cifar10", input_shape=(16, 16, 3), head="nat")
    assert default_endpoints(nin) == {"sc": "flatten"}
    assert default_pooling(nin, "embedding") == "none"
    assert default_pooling(nin, "block1") == "flatten"
    alexnet = build_model("alexnet", input_shape=(67, 67, 3), head="none")
    assert default_endpoints(alexnet) == {"conv5": "max3x3"}  # conv5 is 3x3 at 67x67
    alexnet = build_model("alexnet", input_shape=(127, 127, 1), head="none")
    assert default_endpoints(alexnet) == {"conv5": "max6x6"}  # conv5 is 7x7 at 127x127
    with pytest.raises(ValueError, match="no endpoint 'conv9'"):
        default_pooling(alexnet, "conv9")


def test_next_version(tmp_path):
    assert next_version(str(tmp_path / "absent")) == 1
    for name in ("1", "3", "tmp", "7x", ".tmp-9-1"):
        (tmp_path / name).mkdir()
    assert next_version(str(tmp_path)) == 4


# ----------------------------------------------------------------------------- the export

def test_layout_and_metadata(grey, rgb):
    _, path, _ = grey
    assert os.path.basename(path) == "1" and os.path.basename(os.path.dirname(path)) == "digits"
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    meta = read_metadata(path)
    assert meta["model"] == "nin_mnist" and meta["model_name"] == "digits"
    assert meta["input_size"] == [16, 16, 1]
    assert meta["endpoints"] == {"sc": {"pooling": "max2x2", "shape": [2 * 2 * 64]},
                                 "embedding": {"pooling": "none", "shape": [8]}}
    assert meta["checkpoint"] == "/runs/x/ckpt-7" and meta["method"] == "nat"
    assert json.loads(grey[2].metadata().numpy().decode()) == meta
    assert read_metadata(rgb[1])["endpoints"] == {"sc": {"pooling": "flatten",
                                                         "shape": [4 * 4 * 192]}}
    assert read_metadata(rgb[1])["checkpoint"] is None
    # Nothing half-written is left beside the version.
    assert os.listdir(os.path.dirname(path)) == ["1"]


def test_second_export_is_version_2(rgb):
    model, path, _ = rgb
    base = os.path.dirname(os.path.dirname(path))
    second = export_features(model, base, "cifar", {"block1": "avg"})
    assert second == os.path.join(base, "cifar", "2")
    assert read_metadata(second)["endpoints"]["block1"] == {"pooling": "avg", "shape": [96]}


def test_signatures_match_the_model(grey):
    model, _, loaded = grey
    endpoints = [("sc", "max2x2"), ("embedding", "none")]
    pixels = _images((3, 16, 16, 1))
    want = _expected(model, pixels / np.float32(255), endpoints)
    calls = {
        "float": loaded.signatures["serving_default"](
            images=tf.constant(pixels.astype(np.float32) / 255)),
        "uint8": loaded.signatures["serving_uint8"](images=tf.constant(pixels)),
        "features(uint8)": loaded.features(tf.constant(pixels)),
        "bytes": loaded.signatures["image_bytes"](
            image_bytes=tf.constant([tf.io.encode_png(p).numpy() for p in pixels])),
    }
    for label, got in calls.items():
        assert sorted(got) == ["embedding", "sc"], label
        for name in want:
            assert got[name].dtype == tf.float32
            np.testing.assert_allclose(got[name].numpy(), want[name], atol=TOL, err_msg=label)


def test_a_mixed_precision_network_is_served_in_float32(tmp_path):
    # The pretraining binary exports the float32 copy of a mixed-precision network; a mixed
    # network exported as it is takes and returns float32 too (bf16 inside).
    kwargs = dict(input_shape=(16, 16, 1), head="nat", feature_dim=8)
    mixed = build_model("nin_mnist", precision="bf16", **kwargs)
    _randomise_statistics(mixed, 2)
    copy = float32_copy(mixed, "nin_mnist", **kwargs)
    pixels = _images((3, 16, 16, 1))
    want = _expected(copy, pixels / np.float32(255), [("embedding", "none")])["embedding"]
    loaded = tf.saved_model.load(export_features(mixed, str(tmp_path), "mixed",
                                                 {"embedding": "none"}))
    for signature, images in (("serving_default", pixels.astype(np.float32) / 255),
                              ("serving_uint8", pixels)):
        got = loaded.signatures[signature](images=tf.constant(images))["embedding"]
        assert got.dtype == tf.float32
        np.testing.assert_allclose(got.numpy(), want, atol=0.05)  # bf16: 8-bit mantissa


def test_resize_and_channel_rules(grey, rgb):
    # A grey model given RGB images of another size: channel mean, then antialiased bilinear.
    model, _, loaded = grey
    images = np.random.default_rng(2).uniform(size=(2, 24, 20, 3)).astype(np.float32)
    grey_images = images.mean(axis=-1, keepdims=True)
    resized = tf.image.resize(grey_images, (16, 16), method="bilinear", antialias=True)
    want = _expected(model, resized, [("sc", "max2x2")])["sc"]
    got = loaded.signatures["serving_default"](images=tf.constant(images))["sc"].numpy()
    np.testing.assert_allclose(got, want, atol=TOL)
    # An RGB model given grey images: tiled to 3 channels.
    model, _, loaded = rgb
    grey_images = np.random.default_rng(3).uniform(size=(2, 16, 16, 1)).astype(np.float32)
    want = _expected(model, np.tile(grey_images, (1, 1, 1, 3)), [("sc", "flatten")])["sc"]
    got = loaded.signatures["serving_default"](images=tf.constant(grey_images))["sc"].numpy()
    np.testing.assert_allclose(got, want, atol=TOL)
    # Encoded images of mixed sizes and modes in one batch: decoded to RGB, resized one by one.
    pixels = [_images((16, 16, 3), 4), _images((30, 22, 1), 5)]
    blobs = [tf.io.encode_png(p).numpy() for p in pixels]
    inputs = [p / np.float32(255) for p in pixels]
    inputs[1] = tf.image.resize(np.tile(inputs[1], (1, 1, 3)), (16, 16), antialias=True)
    want = _expected(model, np.stack(inputs), [("sc", "flatten")])["sc"]
    got = loaded.signatures["image_bytes"](image_bytes=tf.constant(blobs))["sc"].numpy()
    np.testing.assert_allclose(got, want, atol=TOL)


def test_bad_input_gives_clear_errors(grey):
    _, _, loaded = grey
    serve = loaded.signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a float tensor"):
        serve(images=tf.zeros([1, 16, 16, 1], tf.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[N, H, W, C\] \(rank 4\)"):
        serve(images=tf.zeros([16, 16, 1]))
    for channels in (2, 4):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"1 \(grayscale\) or 3 \(RGB\) channels"):
            serve(images=tf.zeros([1, 16, 16, channels]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="Unknown image file format"):
        loaded.signatures["image_bytes"](image_bytes=tf.constant([b"not an image"]))
    with pytest.raises(ValueError, match="Could not find matching concrete function"):
        loaded.features(tf.zeros([1, 16, 16, 1], tf.float64))


def test_export_rejects_bad_arguments(grey, tmp_path):
    model = grey[0]
    with pytest.raises(ValueError, match="model_name must match"):
        export_features(model, str(tmp_path), "a/b")
    with pytest.raises(ValueError, match="no endpoint 'conv5'"):
        export_features(model, str(tmp_path), "m", {"conv5": "avg"})
    with pytest.raises(ValueError, match="needs a feature map"):
        export_features(model, str(tmp_path), "m", {"embedding": "max"})
    assert not os.listdir(tmp_path)


def _graph_ops(path):
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    ops = set()
    for meta_graph in proto.meta_graphs:
        ops |= {node.op for node in meta_graph.graph_def.node}
        for function in meta_graph.graph_def.library.function:
            ops |= {node.op for node in function.node_def}
    return ops


def test_no_pyfunc_ops(grey, rgb):
    for _, path, _ in (grey, rgb):
        ops = _graph_ops(path)
        # The scan reaches into function bodies: the convolutions and the decoder are there.
        assert {"Conv2D", "DecodeImage", "MaxPool"} <= ops
        assert not ops & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}


# ----------------------------------------------------------------------------- consumers

def _clean_env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


@pytest.mark.slow
def test_fresh_process_reload(grey, tmp_path):
    model, path, _ = grey
    pixels = _images((4, 16, 16, 1), 6)
    np.save(tmp_path / "images.npy", pixels.astype(np.float32) / 255)
    blobs = [tf.io.encode_png(p).numpy() for p in pixels]
    np.save(tmp_path / "blobs.npy", np.array(blobs, dtype=object), allow_pickle=True)
    script = textwrap.dedent(f"""
        import importlib.util, numpy as np, tensorflow as tf
        assert importlib.util.find_spec("models") is None, "the project is importable"
        loaded = tf.saved_model.load({path!r})
        images = np.load("images.npy")
        blobs = np.load("blobs.npy", allow_pickle=True).tolist()
        a = loaded.signatures["serving_default"](images=tf.constant(images))
        b = loaded.signatures["image_bytes"](image_bytes=tf.constant(blobs))
        np.savez("out.npz", **{{"default_" + k: v.numpy() for k, v in a.items()}},
                 **{{"bytes_" + k: v.numpy() for k, v in b.items()}})
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = np.load(tmp_path / "out.npz")
    want = _expected(model, pixels / np.float32(255), [("sc", "max2x2"), ("embedding", "none")])
    for name, value in want.items():
        np.testing.assert_allclose(out[f"default_{name}"], value, atol=TOL)
        np.testing.assert_allclose(out[f"bytes_{name}"], value, atol=TOL)


@pytest.mark.slow
def test_saved_model_cli_show_and_run(rgb, tmp_path):
    model, path, _ = rgb
    cli = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    shown = subprocess.run([*cli, "show", "--dir", path, "--tag_set", "serve"],
                           capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    for signature in ("serving_default", "serving_uint8", "image_bytes"):
        assert signature in shown.stdout
    images = np.random.default_rng(7).uniform(size=(2, 16, 16, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    ran = subprocess.run(
        [*cli, "run", "--dir", path, "--tag_set", "serve", "--signature_def", "serving_default",
         "--inputs", f"images={tmp_path / 'x.npy'}", "--outdir", str(tmp_path / "out")],
        capture_output=True, text=True, env=_clean_env(), cwd=tmp_path, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    want = _expected(model, images, [("sc", "flatten")])["sc"]
    np.testing.assert_allclose(np.load(tmp_path / "out" / "sc.npy"), want, atol=TOL)


@pytest.mark.slow
def test_binary_exports_a_training_run(tmp_path):
    run_dir, model = make_run_dir(
        tmp_path / "run", config={"method": "nat", "dataset": "digits"},
        before_save=lambda net: _randomise_statistics(net, 8), input_shape=(12, 12, 1),
        head="nat", feature_dim=4)
    prefix = tf.train.latest_checkpoint(run_dir)
    done = run_module("serving.export", f"--model_dir={run_dir}", "--endpoints=embedding,sc:avg")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == ""  # quiet: no TensorFlow start-up logs
    path = done.stdout.strip().splitlines()[-1]
    assert path == os.path.join(run_dir, "export", "nin_mnist", "1")
    meta = read_metadata(path)
    assert meta["checkpoint"] == prefix and meta["dataset"] == "digits"
    assert meta["endpoints"]["embedding"]["pooling"] == "none"
    pixels = _images((2, 12, 12, 1), 9)
    got = tf.saved_model.load(path).signatures["serving_uint8"](images=tf.constant(pixels))
    want = _expected(model, pixels / np.float32(255), [("embedding", "none"), ("sc", "avg")])
    for name, value in want.items():
        np.testing.assert_allclose(got[name].numpy(), value, atol=TOL)


def test_config_and_run_reject_bad_runs(tmp_path):
    config = ExportConfig(model_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no config.json: not a run"):
        run(config)
    (tmp_path / "config.json").write_text(json.dumps({"model": "nin_mnist",
                                                      "model_kwargs": {}}))
    with pytest.raises(FileNotFoundError, match=f"no checkpoint in directory {tmp_path}"):
        run(config)
    with pytest.raises(UsageError, match="--model_kwargs is not JSON"):
        replace(config, model_kwargs="{head: nat}")
    with pytest.raises(UsageError, match="--model=vgg: choose one of alexnet"):
        replace(config, init="random", model="vgg")
    with pytest.raises(UsageError, match=r"--model_dir \(or --checkpoint\) is required"):
        ExportConfig()
    missing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match=f"run folder {missing} does not exist"):
        run(ExportConfig(model_dir=str(missing)))
