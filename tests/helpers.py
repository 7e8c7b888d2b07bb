"""What many tests share: a run folder as the zoo writes it, a two-replica strategy, running a
binary as users do, and reading a run's summaries (with the library's own reader)."""

from __future__ import annotations

import io
import itertools
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data import fashion_mnist
from data import voc as voc_data
from evaluation.voc.fast_rcnn import boxes as box_ops
from models import build_model
from models.checkpoints import open_checkpoints
from models.pooling import pool_features
from models.weights import named_variables
from runtime.run_config import write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_run_dir(path, model: str = "nin_mnist", seed: int = 0, config: dict | None = None,
                 before_save=None, **model_kwargs) -> tuple[str, keras.Model]:
    """A run folder as a training binary leaves it (models/runs.py): config.json naming the
    model and its kwargs (plus `config`), and one name-keyed checkpoint of a network built
    under `seed` (and changed by `before_save(net)`, if given). Returns (the folder, the
    network)."""
    path = str(path)
    keras.utils.set_random_seed(seed)
    net = build_model(model, **model_kwargs)
    if before_save is not None:
        before_save(net)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in model_kwargs.items()}
    write_config(path, {"model": model, "model_kwargs": kwargs, **(config or {})})
    _, manager, _ = open_checkpoints(path, {"model": named_variables(net)}, keep=1)
    manager.save()
    return path, net


_KEY_BASES = itertools.count(1)


def two_replica_strategy() -> tf.distribute.MirroredStrategy:
    """A MirroredStrategy over the two logical CPUs of tests/conftest.py, with collective keys
    of its own.

    Strategies built in one process start their collective keys at the same base, so two of
    them running collectives of different shapes abort with "Shape mismatch in the collective
    instance". TensorFlow's own tests separate them with the class attribute
    `_collective_key_base`, which is read at construction only: each strategy here gets a base
    of its own, and the attribute is restored at once.
    """
    cls = tf.distribute.MirroredStrategy
    saved = cls._collective_key_base
    cls._collective_key_base = 7_000_000 + 1000 * next(_KEY_BASES)
    try:
        return cls(["/cpu:0", "/cpu:1"])
    finally:
        cls._collective_key_base = saved


def test_env(**extra) -> dict:
    """The environment of a binary run by a test: the repository on the path, no cluster."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


test_env.__test__ = False  # not a test, despite its name


def run_module(module: str, *args: str, timeout: float = 600, env: dict | None = None,
               cwd: str | None = None) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repository root (or `cwd`), as a user runs it."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd or ROOT,
                          env=env or test_env(), capture_output=True, text=True,
                          timeout=timeout)


def scalars(model_dir: str) -> dict[str, list[float]]:
    """{tag: values in step order} of a run's training summaries (`<model_dir>/train`)."""
    from evaluation.visualize_lib import read_scalars

    return {tag: list(values) for tag, (_, values) in
            read_scalars(os.path.join(str(model_dir), "train")).items()}


def folder_contents(folder) -> dict[str, bytes]:
    """Every file under `folder`: relative path -> contents (to show that nothing changed)."""
    found = {}
    for root, _, files in os.walk(str(folder)):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, str(folder))] = f.read()
    return found


def checkpoint_tensors(prefix: str) -> dict[str, np.ndarray]:
    """Every saved variable of a checkpoint, by key (not its object graph, which also holds
    the names Keras gave Python objects, e.g. "sgd_1" for a process's second optimizer)."""
    reader = tf.train.load_checkpoint(str(prefix))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if key != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def is_permutation(values) -> bool:
    """True when `values` holds each of 0..len-1 exactly once."""
    values = np.asarray(values)
    return bool(np.array_equal(np.sort(values), np.arange(len(values))))


def assignment(model_dir: str) -> np.ndarray:
    """The NAT assignment of a run's latest checkpoint."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir)))
    return reader.get_tensor("nat/assignment/.ATTRIBUTES/VARIABLE_VALUE")


# ------------------------------------------------------------- probes: a known answer


def identity_model(shape=(4, 4, 1)):
    inputs = keras.Input(shape, name="images")
    return keras.Model(inputs, {"feat": keras.layers.Activation("linear", name="feat")(inputs)},
                       name="identity")


# --------------------------------------------- voc/2007 examples for tfds.testing.mock_data

CLS = {name: i for i, name in enumerate(voc_data.VOC_CLASSES)}


def make_example(filename: str, image: np.ndarray,
                 objects: Sequence[tuple[str, tuple[int, int, int, int], bool]]) -> dict:
    """A decoded tfds voc/2007 example, built the way the tfds builder builds one.

    `objects` are (class, devkit box (x1, y1, x2, y2), difficult); as in tfds, the stored
    bbox is (ymin / H, xmin / W, ymax / H, xmax / W) in float32, `labels` the sorted classes
    of all objects and `labels_no_difficult` those of the non-difficult ones.
    """
    height, width = image.shape[:2]
    boxes = np.array([[y1 / height, x1 / width, y2 / height, x2 / width]
                      for _, (x1, y1, x2, y2), _ in objects], np.float32).reshape(-1, 4)
    label = np.array([CLS[c] for c, _, _ in objects], np.int64)
    difficult = np.array([d for _, _, d in objects], bool)
    return {
        "image": image.astype(np.uint8),
        "image/filename": filename,
        "objects": {"label": label, "bbox": boxes, "pose": np.zeros(len(objects), np.int64),
                    "is_truncated": np.zeros(len(objects), bool), "is_difficult": difficult},
        "labels": np.array(sorted(set(label.tolist())), np.int64),
        "labels_no_difficult": np.array(sorted(set(label[~difficult].tolist())), np.int64),
    }


def as_dataset_fn(splits: dict[str, list[dict]], requested: list[str] | None = None
                  ) -> Callable:
    """A mock `_as_dataset` serving `splits[split]` with the builder's own feature specs."""

    def fn(self, split, decoders=None, read_config=None, **kwargs):
        del decoders, read_config, kwargs
        if requested is not None:
            requested.append(str(split))
        examples = splits[str(split)]
        spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype),
                                     self.info.features.get_tensor_info())
        return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=spec)

    return fn


# ------------------------------------- detection: drawn shapes on textured backgrounds

SQUARE, DISC = 1, 2  # class indices (1-based; 0 is background)


def shape_image(rng: np.random.Generator, size: tuple[int, int] = (128, 160),
                num_objects: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image of bright squares (class 1) and discs (class 2) on a noisy striped background.

    Returns (image [H, W, 3] uint8, boxes [G, 4] devkit 1-based inclusive, labels [G]).
    The objects do not overlap; each is 36-60 pixels wide.
    """
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width]
    period = rng.uniform(6, 14)
    stripes = 0.5 + 0.5 * np.sin((xx * rng.uniform(-1, 1) + yy) * 2 * np.pi / period)
    image = 60 + 60 * stripes[..., None] * rng.uniform(0.3, 1.0, 3) + rng.normal(0, 12, (
        height, width, 3))
    boxes: list[np.ndarray] = []
    attempts = 0
    while len(boxes) < num_objects:
        side = int(rng.integers(36, 61))
        x1, y1 = int(rng.integers(1, width - side + 2)), int(rng.integers(1, height - side + 2))
        box = np.array([x1, y1, x1 + side - 1, y1 + side - 1])
        attempts += 1
        if boxes and box_ops.iou_matrix(box[None], np.array(boxes)).max() > 0:
            if attempts % 100 == 0:  # the first objects may leave no room: start over
                boxes = []
            continue
        boxes.append(box)
    labels = [SQUARE if i % 2 == 0 else DISC for i in range(num_objects)]
    for (x1, y1, x2, y2), label in zip(boxes, labels, strict=True):
        colour = rng.uniform(150, 255, 3)  # the same for both classes: shape tells them apart
        inside = (xx >= x1 - 1) & (xx <= x2 - 1) & (yy >= y1 - 1) & (yy <= y2 - 1)
        if label == DISC:
            cx, cy, radius = (x1 + x2) / 2 - 1, (y1 + y2) / 2 - 1, (x2 - x1 + 1) / 2
            inside &= (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
        image[inside] = colour + rng.normal(0, 12, (int(inside.sum()), 3))
    return (np.clip(image, 0, 255).astype(np.uint8), np.array(boxes, np.int64),
            np.array(labels, np.int64))


def jittered_proposals(rng: np.random.Generator, gt: np.ndarray, height: int, width: int,
                       per_box: int = 40, background: int = 120) -> np.ndarray:
    """Proposals around each ground-truth box (shifted and rescaled by up to ~30%) and
    random boxes anywhere, clipped to the image: [P, 4] int32 devkit boxes."""
    out = []
    for x1, y1, x2, y2 in gt:
        w, h = x2 - x1 + 1, y2 - y1 + 1
        dx, dy = rng.uniform(-0.3, 0.3, (2, per_box))
        sw, sh = np.exp(rng.uniform(-0.3, 0.3, (2, per_box)))
        cx, cy = x1 + w / 2 + dx * w, y1 + h / 2 + dy * h
        out.append(np.stack([cx - sw * w / 2, cy - sh * h / 2, cx + sw * w / 2 - 1,
                             cy + sh * h / 2 - 1], axis=1))
    x1 = rng.uniform(1, width - 16, background)
    y1 = rng.uniform(1, height - 16, background)
    out.append(np.stack([x1, y1, x1 + rng.uniform(16, width / 2, background),
                         y1 + rng.uniform(16, height / 2, background)], axis=1))
    boxes = np.rint(box_ops.clip_boxes(np.concatenate(out), height, width))
    return boxes.astype(np.int32)


# ------------------------------------------------ serving: the export of a tiny network

SIZE = 16
TOL = 1e-5


def features_of(model, images):
    """The in-process oracle: float images [n, 16, 16, 1] in [0, 1] -> {output: features}."""
    out = model(tf.constant(images, tf.float32), training=False)
    return {"sc": pool_features(out["sc"], "avg").numpy(), "embedding": out["embedding"].numpy()}


def decoded(path):
    """What the export should see for a file: RGB, channel mean, resized to 16x16, in [0, 1]."""
    with open(path, "rb") as f:
        return decoded_blob(f.read())


def decoded_blob(blob):
    rgb = tf.io.decode_image(blob, channels=3, expand_animations=False).numpy()
    grey = (rgb / np.float32(255)).mean(axis=-1, keepdims=True)
    if grey.shape[:2] != (SIZE, SIZE):
        grey = tf.image.resize(grey, (SIZE, SIZE), antialias=True).numpy()
    return grey


# ------------------------------------------------------------------------- image files


def jpeg_bytes(height: int, width: int, seed: int = 0, subsampling: int = 2,
               mode: str = "RGB") -> bytes:
    """A JPEG (quality 90) of smooth colours plus noise, with chroma subsampling 0 (4:4:4),
    1 (4:2:2) or 2 (4:2:0, libjpeg's default and most photographs')."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3),
                                          dtype=np.uint8)).resize((width, height))
    pixels = np.asarray(coarse, np.float32) + rng.normal(0, 10, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, **({"subsampling": subsampling} if mode == "RGB" else {}))
    return out.getvalue()


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct loopback ports free now (all bound at once, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


NO_FASHION_MNIST = (f"{fashion_mnist.DEBIAN_DIR} is absent: `apt-get install "
                    "dataset-fashion-mnist` (.ci/run installs it where it can)")
needs_fashion_mnist = pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_DIR),
                                         reason=NO_FASHION_MNIST)
