"""`run` of `python -m evaluation.visualize`, whose docstring states the protocol."""

from __future__ import annotations

import os
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from PIL import Image
from scipy.signal import convolve2d

from data import DataError, digits, prepared
from evaluation import figures
from evaluation.visualize import VisualizeConfig
from models.layers import SOBEL_X, SOBEL_Y
from models.runs import load_run_model
from runtime.cli import UsageError
from runtime.errors import InvalidInput

PAD = 1


# ----------------------------------------------------------------------------- filters

def compose_sobel(kernel: np.ndarray) -> np.ndarray:
    """[k, k, 2, F] conv1 kernels after a Sobel front -> [k + 2, k + 2, F] grey-image filters."""
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 4 or kernel.shape[2] != 2:
        raise ValueError(f"expected a [k, k, 2, F] kernel after the Sobel front; got "
                         f"{kernel.shape}")
    fronts = (SOBEL_X, SOBEL_Y)
    return np.stack([sum(convolve2d(kernel[:, :, c, f], fronts[c], mode="full")
                         for c in range(2)) for f in range(kernel.shape[3])], axis=-1)


def first_conv_filters(model) -> np.ndarray:
    """The first convolution's filters in image space: [F, h, w, 1 or 3]."""
    conv = next((layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)),
                None)
    if conv is None:
        raise InvalidInput(f"{model.name} has no Conv2D layer")
    kernel = np.asarray(conv.kernel)
    names = {layer.name for layer in model.layers}
    if "sobel" in names:
        return np.moveaxis(compose_sobel(kernel), -1, 0)[..., None]
    if kernel.shape[2] not in (1, 3):
        raise InvalidInput(f"{conv.name} has {kernel.shape[2]} input channels: not an image")
    return np.moveaxis(kernel, -1, 0)


def _scaled(image: np.ndarray) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    return (image - low) / (high - low) if high > low else np.full_like(image, 0.5)


def filter_grid(filters: np.ndarray, columns: int = 16, scale: int = 4) -> np.ndarray:
    """uint8 RGB grid of filters [F, h, w, C]: each min-max scaled, `scale`x enlarged."""
    filters = np.asarray(filters, dtype=np.float64)
    count, h, w, channels = filters.shape
    columns = min(columns, count)
    rows = -(-count // columns)
    ch, cw = h * scale + PAD, w * scale + PAD
    grid = np.ones((rows * ch + PAD, columns * cw + PAD, 3))
    for f in range(count):
        cell = _scaled(filters[f])
        cell = np.repeat(np.repeat(cell, scale, axis=0), scale, axis=1)
        if channels == 1:
            cell = np.repeat(cell, 3, axis=-1)
        r, c = divmod(f, columns)
        grid[PAD + r * ch:PAD + r * ch + h * scale, PAD + c * cw:PAD + c * cw + w * scale] = cell
    return np.round(grid * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- retrieval

def nearest_neighbours(features: np.ndarray, queries: Sequence[int], k: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """([q, k] indices, [q, k] cosine similarities) of the k most cosine-similar rows to each
    query row, itself excluded. Ties go to the lower index (stable sort of -similarity).
    """
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    if not 1 <= k < len(x):
        raise InvalidInput(f"k must be in [1, {len(x) - 1}] for {len(x)} images; got {k}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    queries = np.asarray(queries, dtype=np.int64)
    similarity = x[queries] @ x.T
    similarity[np.arange(len(queries)), queries] = -np.inf
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(similarity, order, axis=1)


# ----------------------------------------------------------------------------- curves

def read_scalars(model_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tag: (steps, values)} of every scalar in the event files under `model_dir`.

    Reads tf.summary scalars (tensor values) and v1 simple values; steps sorted, and a step
    written twice keeps its last value.
    """
    found: dict[str, dict[int, float]] = {}
    for root, _, files in sorted(os.walk(model_dir)):
        prefix = os.path.relpath(root, model_dir)
        for name in sorted(files):
            if "tfevents" not in name:
                continue
            for record in tf.data.TFRecordDataset(os.path.join(root, name)):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    if value.HasField("simple_value"):
                        number = value.simple_value
                    elif value.HasField("tensor") and not value.tensor.tensor_shape.dim:
                        number = float(tf.make_ndarray(value.tensor))
                    else:
                        continue
                    tag = value.tag if prefix == "." else f"{prefix}/{value.tag}"
                    found.setdefault(tag, {})[event.step] = number
    return {tag: (np.array(sorted(points)), np.array([points[s] for s in sorted(points)]))
            for tag, points in sorted(found.items())}




def _filters(f: VisualizeConfig) -> None:
    loaded = load_run_model(f.pretrained, f.model, init=f.init, seed=f.seed)
    filters = first_conv_filters(loaded.model)
    sobel = any(layer.name == "sobel" for layer in loaded.model.layers)
    weights = "random init" if f.init == "random" else os.path.basename(
        loaded.checkpoint or f.pretrained)
    title = (f"First-layer filters of {loaded.name} ({weights})"
             + (", composed with the Sobel front: filters on the grey image (NAT Figure 4)"
                if sobel else ""))
    figures.plot_filters(filter_grid(filters, f.columns, f.scale), len(filters),
                         filters.shape[1:3], title, f.output)


TFDS_PREFIX = "tfds:"


def tfds_key(key: str) -> tuple[str, str, int]:
    """(dataset, split, position) of an index line `tfds:<name>/<split>/<position>`, as
    serving.extract_features writes it; the name may hold a config (`name/config`)."""
    parts = key[len(TFDS_PREFIX):].rsplit("/", 2)
    if not key.startswith(TFDS_PREFIX) or len(parts) != 3 or not all(parts) or \
            not parts[2].isdigit():
        raise InvalidInput(f"{key!r} is not tfds:<name>/<split>/<position>")
    return parts[0], parts[1], int(parts[2])


def _cell(image: Image.Image, cell: int) -> np.ndarray:
    with image:
        rgb = image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
        return np.asarray(rgb, dtype=np.uint8)


def image_and_label(name: str, cell: int) -> tuple[np.ndarray, str | None]:
    """uint8 RGB [cell, cell, 3] of an extracted image and its label: digits keys carry their
    class; a file's label is the name of its folder. tfds rows: `load_images`."""
    if name.startswith(TFDS_PREFIX):
        raise ValueError(f"{name}: tfds rows are read together, by load_images")
    if name.startswith(digits.KEY_PREFIX):
        pixels, label = digits.from_key(name)
        return _cell(Image.fromarray(pixels), cell), str(label)
    return _cell(Image.open(name), cell), os.path.basename(os.path.dirname(name))


def load_images(names: dict[int, str], cell: int, data_dir: str | None = None,
                manual_dir: str | None = None) -> dict[int, tuple[np.ndarray, str | None]]:
    """{row: (uint8 RGB [cell, cell, 3], label)} of index lines `names` ({row: line}).

    Digits and files as `image_and_label`. tfds rows (`tfds:<name>/<split>/<position>`) are
    read from the prepared split in `data_dir` (`data.prepared.examples_at`): one pass per
    split, up to its last position needed; the label is the class name of tfds's info when
    it has one (else the integer; None when the dataset has no label). Raises DataError when
    a split cannot be read.
    """
    loaded, splits = {}, {}
    for row, name in names.items():
        if name.startswith(TFDS_PREFIX):
            dataset, split, position = tfds_key(name)
            splits.setdefault((dataset, split), {})[row] = position
        else:
            loaded[row] = image_and_label(name, cell)
    for (dataset, split), rows in splits.items():
        read = prepared.examples_at(dataset, split, list(rows.values()), data_dir, manual_dir)
        for row, position in rows.items():
            image, label = read.images[position], read.labels.get(position)
            if label is not None:
                label = read.names[label] if read.names and 0 <= label < len(read.names) else \
                    str(label)
            loaded[row] = (_cell(Image.fromarray(np.squeeze(image, -1) if image.shape[-1] == 1
                                                 else image), cell), label)
    return loaded


def _tfds_source(names: Sequence[str]) -> str:
    """" of <name>/<split>" when every line is a row of that one tfds split, else ""."""
    sources = {name[len(TFDS_PREFIX):].rsplit("/", 1)[0] if name.startswith(TFDS_PREFIX)
               else None for name in names}
    return f" of {sources.pop()}" if len(sources) == 1 and None not in sources else ""


def _retrieval(f: VisualizeConfig) -> None:
    features = np.load(f.features)
    index_path = f.index or os.path.join(os.path.dirname(f.features), "index.txt")
    with open(index_path) as handle:
        names = [line.rstrip("\n") for line in handle]
    if len(names) != len(features):
        raise UsageError(f"{index_path} lists {len(names)} images for {len(features)} rows "
                         f"of {f.features}")
    if f.query_indices:
        queries = list(f.query_indices)
        if any(not 0 <= i < len(names) for i in queries):
            raise UsageError(f"--query_indices must be in [0, {len(names)})")
    else:
        rng = np.random.default_rng(f.seed)
        queries = sorted(rng.choice(len(names), min(f.queries, len(names)), replace=False))
    neighbours, similarity = nearest_neighbours(features, queries, f.k)
    rows = sorted({*queries, *neighbours.ravel().tolist()})
    try:
        loaded = load_images({i: names[i] for i in rows}, f.cell, f.data_dir, f.manual_dir)
    except InvalidInput as err:  # a malformed line, or a tfds split that cannot be read
        hint = "; or point --data_dir at where it is prepared" if (
            isinstance(err, DataError) and not f.data_dir) else ""
        raise InvalidInput(f"{index_path}: {err}{hint}") from None
    title = (f"Nearest neighbours by cosine similarity of {os.path.basename(f.features)} "
             f"({len(names)} images{_tfds_source(names)})")
    figures.plot_retrieval({i: v[0] for i, v in loaded.items()},
                           {i: v[1] for i, v in loaded.items()}, queries, neighbours,
                           similarity, title, f.output)


def _curves(f: VisualizeConfig) -> None:
    figures.plot_curves(read_scalars(f.pretrained), f.output, f.width, f.height)


def run(config: VisualizeConfig) -> str:
    {"filters": _filters, "retrieval": _retrieval, "curves": _curves}[config.figure](config)
    print(config.output)
    return config.output
