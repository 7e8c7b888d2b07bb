"""serving/export.py and export_lib.py: layout, signatures, bad input, consumers, the binary."""

import io
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
from models.pooling import pool_features
from models.precision import float32_copy
from runtime.cli import UsageError
from serving.export import ExportConfig, parse_endpoints
from serving.export_lib import (
    checkpoint_digest,
    clean_staging,
    default_endpoints,
    default_pooling,
    export_features,
    next_version,
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
    # Nothing half-written is left beside the version; the exports' lock file is ignored by
    # TF Serving, which serves integer-named folders only.
    assert sorted(os.listdir(os.path.dirname(path))) == [".lock", "1"]


def test_second_export_is_version_2(rgb):
    model, path, _ = rgb
    base = os.path.dirname(os.path.dirname(path))
    second = export_features(model, base, "cifar", {"block1": "avg"})
    assert second == os.path.join(base, "cifar", "2")
    assert read_metadata(second)["endpoints"]["block1"] == {"pooling": "avg", "shape": [96]}


def test_exporting_the_same_checkpoint_again_publishes_nothing(tmp_path):
    run_dir, model = make_run_dir(tmp_path / "run", input_shape=(12, 12, 1), head="none")
    prefix = tf.train.latest_checkpoint(run_dir)
    base, said = str(tmp_path / "export"), []
    meta = {"checkpoint": prefix, "model_kwargs": {"head": "none"}}
    first = export_features(model, base, "m", None, dict(meta), log=said.append)
    assert first == os.path.join(base, "m", "1") and said == []
    assert read_metadata(first)["checkpoint_digest"] == checkpoint_digest(prefix)
    again = export_features(model, base, "m", None, dict(meta, method="sc"), log=said.append)
    assert again == first and said == [
        f"{first} already holds this export (checkpoint {prefix}): nothing new published"]
    # Another pooling, other kwargs or another checkpoint: a new version each.
    assert export_features(model, base, "m", {"sc": "avg"}, dict(meta)).endswith("/2")
    assert export_features(model, base, "m", {"sc": "avg"}, dict(
        meta, model_kwargs={"head": "none", "input_shape": [12, 12, 1]})).endswith("/3")
    tf.train.Checkpoint(v=tf.Variable(1.0)).write(str(tmp_path / "run" / "ckpt-2"))
    other = str(tmp_path / "run" / "ckpt-2")
    assert export_features(model, base, "m", {"sc": "avg"}, dict(
        meta, model_kwargs={"head": "none", "input_shape": [12, 12, 1]},
        checkpoint=other)).endswith("/4")
    # Without a checkpoint (random init) every export is new.
    assert export_features(model, base, "m").endswith("/5")
    assert export_features(model, base, "m").endswith("/6")


def test_staging_left_by_a_dead_export_is_removed(tmp_path):
    model = build_model("nin_mnist", input_shape=(12, 12, 1), head="none")
    base = tmp_path / "export" / "m"
    (base / ".tmp-1-4242" / "variables").mkdir(parents=True)
    (base / ".tmp-1-4242" / "saved_model.pb").write_bytes(b"half")
    (base / "notes").mkdir()
    said = []
    assert clean_staging(str(base), said.append) == (".tmp-1-4242",)
    assert said == [f"removed 1 unfinished export(s) of an interrupted process from {base}: "
                    ".tmp-1-4242"]
    assert sorted(os.listdir(base)) == [".lock", "notes"]
    (base / ".tmp-1-4243").mkdir()
    assert export_features(model, str(tmp_path / "export"), "m").endswith("/1")
    assert sorted(os.listdir(base)) == [".lock", "1", "notes"]


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


FLOAT_EXPECTED = "expected input images, float32 [N, H, W, C] in [0, 1]"
BYTES_EXPECTED = "expected input image_bytes, string [N], encoded JPEG/PNG/GIF/BMP/WebP"


def _fails_with(call, message: str) -> None:
    """`call()` fails with InvalidArgumentError carrying exactly the check's `message`."""
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        call()
    assert f"assertion failed: [{message}]" in err.value.message, err.value.message


def test_bad_input_gives_one_clear_error_naming_the_signature(grey):
    _, _, loaded = grey
    serve, uint8 = loaded.signatures["serving_default"], loaded.signatures["serving_uint8"]
    encoded = loaded.signatures["image_bytes"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a float tensor"):
        serve(images=tf.zeros([1, 16, 16, 1], tf.int32))
    _fails_with(lambda: serve(images=tf.zeros([16, 16, 1])),
                f"serving_default: {FLOAT_EXPECTED} (rank 4); got shape [16 16 1]")
    _fails_with(lambda: uint8(images=tf.zeros([1, 1, 16, 16, 1], tf.uint8)),
                "serving_uint8: expected input images, uint8 [N, H, W, C] (rank 4); got shape "
                "[1 1 16 16 1]")
    for channels in (2, 4):
        _fails_with(lambda c=channels: uint8(images=tf.zeros([1, 16, 16, c], tf.uint8)),
                    "serving_uint8: images must have 1 (grayscale) or 3 (RGB) channels; got "
                    f"shape [1 16 16 {channels}]")
    for bad in (np.nan, np.inf, -np.inf):
        images = np.zeros([2, 16, 16, 1], np.float32)
        images[1, 3, 4, 0] = bad
        _fails_with(lambda x=images: serve(images=tf.constant(x)),
                    f"serving_default: images holds NaN or Inf pixels; {FLOAT_EXPECTED}")
    png = tf.io.encode_png(_images((16, 16, 1))).numpy()
    _fails_with(lambda: encoded(image_bytes=tf.constant(png)),
                f"image_bytes: {BYTES_EXPECTED}; got shape []")
    _fails_with(lambda: encoded(image_bytes=tf.constant([[png]])),
                f"image_bytes: {BYTES_EXPECTED}; got shape [1 1]")
    _fails_with(lambda: encoded(image_bytes=tf.constant([png, b""])),
                f"image_bytes: image 1 of the batch is an empty string; {BYTES_EXPECTED}")
    _fails_with(lambda: encoded(image_bytes=tf.constant([b"not an image", png])),
                "image_bytes: image 0 of the batch is not a JPEG, PNG, GIF, BMP or WebP file; "
                f"{BYTES_EXPECTED}")
    # A right header on corrupt data: the decoder's own message (the module docstring says so).
    with pytest.raises(tf.errors.InvalidArgumentError, match="Invalid PNG"):
        encoded(image_bytes=tf.constant([png[:30]]))
    with pytest.raises(ValueError, match="Could not find matching concrete function"):
        loaded.features(tf.zeros([1, 16, 16, 1], tf.float64))


def test_empty_batches_give_empty_features_on_every_signature(grey):
    _, path, loaded = grey
    want = {name: (0, *e["shape"]) for name, e in read_metadata(path)["endpoints"].items()}
    calls = {
        "float": loaded.signatures["serving_default"](images=tf.zeros([0, 16, 16, 1])),
        "float, another size": loaded.signatures["serving_default"](
            images=tf.zeros([0, 20, 24, 3])),
        "uint8": loaded.signatures["serving_uint8"](images=tf.zeros([0, 16, 16, 1], tf.uint8)),
        "bytes": loaded.signatures["image_bytes"](image_bytes=tf.zeros([0], tf.string)),
        "features": loaded.features(tf.zeros([0, 16, 16, 1], tf.uint8)),
    }
    for label, got in calls.items():
        assert {k: tuple(v.shape) for k, v in got.items()} == want, label
        assert all(v.dtype == tf.float32 for v in got.values()), label


def test_every_documented_format_passes_the_format_check(grey):
    model, _, loaded = grey
    from PIL import Image, features

    pixels = _images((16, 16), 11)
    formats = ["PNG", "BMP", "GIF", "JPEG"] + (["WEBP"] if features.check("webp") else [])
    blobs = []
    for name in formats:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=name, **({"lossless": True}
                                                               if name == "WEBP" else {}))
        blobs.append(buffer.getvalue())
    got = loaded.signatures["image_bytes"](image_bytes=tf.constant(blobs))["sc"].numpy()
    want = _expected(model, np.repeat(pixels[None, :, :, None] / np.float32(255), 2, axis=0),
                     [("sc", "max2x2")])["sc"][0]
    lossless = [i for i, name in enumerate(formats) if name != "JPEG"]
    np.testing.assert_allclose(got[lossless], np.tile(want, (len(lossless), 1)), atol=TOL)


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
    done = run_module("serving.export", f"--pretrained={run_dir}", "--endpoints=embedding,sc:avg")
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
    config = ExportConfig(pretrained=str(tmp_path))
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
    with pytest.raises(UsageError, match=r"--pretrained is required unless --init=random"):
        ExportConfig()
    missing = tmp_path / "nothing"
    # --pretrained takes a run folder or a checkpoint prefix: a missing path is named as such
    with pytest.raises(FileNotFoundError, match=f"^{missing} does not exist: give a run folder "
                       "or a checkpoint prefix$"):
        run(ExportConfig(pretrained=str(missing)))


def test_pretrained_may_name_one_checkpoint_of_the_run(tmp_path):
    run_dir, _ = make_run_dir(tmp_path / "run", config={"method": "nat", "dataset": "digits"},
                              input_shape=(12, 12, 1), head="nat", feature_dim=4)
    prefix = tf.train.latest_checkpoint(run_dir)
    path = run(ExportConfig(pretrained=prefix))  # the run's config.json gives the model
    assert path == os.path.join(run_dir, "export", "nin_mnist", "1")
    meta = read_metadata(path)
    assert (meta["checkpoint"], meta["init"], meta["model"]) == (prefix, "pretrained",
                                                                 "nin_mnist")
