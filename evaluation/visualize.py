"""PNG figures of a run: first-layer filters, nearest-neighbour retrieval, training curves.

    python -m evaluation.visualize filters   --model_dir=RUN --output=filters.png
    python -m evaluation.visualize retrieval --features=OUT/sc.npy --output=retrieval.png
    python -m evaluation.visualize curves    --model_dir=RUN --output=curves.png

filters (NAT Figure 4): the first convolution's filters in image space. With a Sobel front
the network sees `conv1 * sobel(gray(image))`; both are linear, so each conv1 filter W_f
([k, k, 2]) composes with the Sobel kernels S_x, S_y into ONE filter on the grey image,

    E_f = W_f[..., 0] (*) S_x + W_f[..., 1] (*) S_y       ((*): full 2-D convolution)

of size (k + 2) x (k + 2): a cross-correlation with W of a cross-correlation with S is a
cross-correlation with their full convolution (away from the image border). A grey front shows
W as it is (one channel); an RGB front shows W as colour; a high-pass front shows W (the
filter before the high-pass). Each filter is min-max scaled to [0, 1] on its own, tiled in a
grid of `--columns`, each pixel drawn as `--scale` x `--scale`, with a 1-pixel border.

retrieval (NAT Figure 3): for each query (column), the query in the top row and its k nearest
neighbours by cosine similarity of the features below (the query itself excluded, ties broken
by the lower index). The images are read from the paths of the extraction's index.txt.

curves: every scalar of the TensorBoard event files under `--model_dir` (one panel per tag,
tags of subdirectories prefixed by the subdirectory, e.g. "train/loss"), against the step.

Sizes are exact: filters (columns (s k' + 1) + 1) x (rows (s k' + 1) + 1) with k' the shown
filter size; retrieval (q (cell + 2) + 2) x ((k + 1) (cell + 2) + 2 + gap); curves --width x
--height pixels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models import cli
from models.cli import UsageError, option

PROGRAM = "evaluation.visualize"

PAD = 1
QUERY_GAP = 6  # pixels between the query row and the neighbour rows


# ----------------------------------------------------------------------------- filters

def compose_sobel(kernel: np.ndarray) -> np.ndarray:
    """[k, k, 2, F] conv1 kernels after a Sobel front -> [k + 2, k + 2, F] grey-image filters."""
    from scipy.signal import convolve2d

    from models.layers import SOBEL_X, SOBEL_Y

    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 4 or kernel.shape[2] != 2:
        raise ValueError(f"expected a [k, k, 2, F] kernel after the Sobel front; got "
                         f"{kernel.shape}")
    fronts = (SOBEL_X, SOBEL_Y)
    return np.stack([sum(convolve2d(kernel[:, :, c, f], fronts[c], mode="full")
                         for c in range(2)) for f in range(kernel.shape[3])], axis=-1)


def first_conv_filters(model) -> np.ndarray:
    """The first convolution's filters in image space: [F, h, w, 1 or 3]."""
    import keras

    conv = next((layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)),
                None)
    if conv is None:
        raise ValueError(f"{model.name} has no Conv2D layer")
    kernel = np.asarray(conv.kernel)
    names = {layer.name for layer in model.layers}
    if "sobel" in names:
        return np.moveaxis(compose_sobel(kernel), -1, 0)[..., None]
    if kernel.shape[2] not in (1, 3):
        raise ValueError(f"{conv.name} has {kernel.shape[2]} input channels: not an image")
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

def nearest_neighbours(features: np.ndarray, queries: Sequence[int], k: int) -> np.ndarray:
    """[q, k] indices of the k most cosine-similar rows to each query row, itself excluded.

    Ties go to the lower index (stable sort of -similarity).
    """
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    if not 1 <= k < len(x):
        raise ValueError(f"k must be in [1, {len(x) - 1}] for {len(x)} images; got {k}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    queries = np.asarray(queries, dtype=np.int64)
    similarity = x[queries] @ x.T
    similarity[np.arange(len(queries)), queries] = -np.inf
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def _load_cell(path: str, cell: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB").resize((cell, cell), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def retrieval_grid(images: Sequence[np.ndarray], queries: Sequence[int], neighbours: np.ndarray,
                   cell: int = 64) -> np.ndarray:
    """uint8 RGB grid: column j = query j (top) and its neighbours (below, nearest first).

    `images` are uint8 [cell, cell, 3], indexed like the features.
    """
    q, k = neighbours.shape
    step = cell + 2 * PAD
    grid = np.full(((k + 1) * step + 2 * PAD + QUERY_GAP, q * step + 2 * PAD, 3), 255, np.uint8)
    for j, query in enumerate(queries):
        column = [query, *neighbours[j]]
        for i, index in enumerate(column):
            top = PAD + i * step + (QUERY_GAP if i else 0) + PAD
            left = PAD + j * step + PAD
            grid[top:top + cell, left:left + cell] = images[index]
    return grid


# ----------------------------------------------------------------------------- curves

def read_scalars(model_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tag: (steps, values)} of every scalar in the event files under `model_dir`.

    Reads tf.summary scalars (tensor values) and v1 simple values; steps sorted, and a step
    written twice keeps its last value.
    """
    import tensorflow as tf

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


def plot_curves(scalars: dict, output: str, width: int = 960, height: int = 640,
                dpi: int = 100) -> None:
    """One panel per tag (value against step) in a width x height PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    if not scalars:
        raise ValueError("no scalar summaries to plot")
    count = len(scalars)
    columns = min(3, count)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width / dpi, height / dpi), dpi=dpi,
                                squeeze=False)
    for ax, (tag, (steps, values)) in zip(axes.flat, scalars.items(), strict=False):
        ax.plot(steps, values, linewidth=1.2)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(output, dpi=dpi, format="png")
    plt.close(figure)


def save_png(image: np.ndarray, output: str) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    Image.fromarray(image).save(output, format="PNG")


# ----------------------------------------------------------------------------- binary

FIGURES = ("filters", "retrieval", "curves")


@dataclass(frozen=True)
class VisualizeConfig:
    """The flags of `python -m evaluation.visualize <figure>`."""

    figure: str = option("", "filters, retrieval or curves (the positional argument).",
                         flag=False)
    output: str = option("", "The PNG to write.")
    model_dir: str = option("", "filters, curves: the training run.")
    model: str = option("", "filters: model name (overrides config.json).")
    init: str = option("checkpoint", "filters: the run's latest checkpoint, or random weights.",
                       choices=("checkpoint", "random"))
    columns: int = option(16, "filters: filters per row.", lower=1)
    scale: int = option(4, "filters: pixels per filter tap.", lower=1)
    features: str = option("", "retrieval: a .npy of features [n, ...].")
    index: str = option("", "retrieval: the index.txt of paths (default: next to --features).")
    queries: int = option(8, "retrieval: number of queries.", lower=1)
    query_indices: tuple[int, ...] = option((), "retrieval: explicit query rows (else random).")
    k: int = option(5, "retrieval: neighbours per query.", lower=1)
    cell: int = option(64, "retrieval: pixels per image.", lower=4)
    seed: int = option(0, "retrieval: seed of the random queries.")
    width: int = option(960, "curves: width in pixels.", lower=100)
    height: int = option(640, "curves: height in pixels.", lower=100)

    def __post_init__(self):
        if self.figure not in FIGURES:
            raise UsageError(f"give one figure: {' | '.join(FIGURES)} (see --help)")
        cli.require("output", self.output)
        if self.figure == "filters" and not (self.model_dir or self.model):
            raise UsageError("filters needs --model_dir (or --model with --init=random)")
        if self.figure == "retrieval":
            cli.require("features", self.features)
        if self.figure == "curves" and not os.path.isdir(self.model_dir):
            raise UsageError(f"curves needs --model_dir, a run folder; got {self.model_dir!r}")


def _filters(f: VisualizeConfig) -> None:
    from models.runs import load_run_model

    loaded = load_run_model(f.model_dir, f.model, init=f.init)
    save_png(filter_grid(first_conv_filters(loaded.model), f.columns, f.scale), f.output)


def _retrieval(f: VisualizeConfig) -> None:
    features = np.load(f.features)
    index_path = f.index or os.path.join(os.path.dirname(f.features), "index.txt")
    with open(index_path) as handle:
        paths = [line.rstrip("\n") for line in handle]
    if len(paths) != len(features):
        raise UsageError(f"{index_path} lists {len(paths)} images for {len(features)} rows "
                         f"of {f.features}")
    if f.query_indices:
        queries = list(f.query_indices)
        if any(not 0 <= i < len(paths) for i in queries):
            raise UsageError(f"--query_indices must be in [0, {len(paths)})")
    else:
        rng = np.random.default_rng(f.seed)
        queries = sorted(rng.choice(len(paths), min(f.queries, len(paths)), replace=False))
    neighbours = nearest_neighbours(features, queries, f.k)
    used = sorted({*queries, *neighbours.ravel().tolist()})
    if any(paths[i].startswith("tfds:") for i in used):
        raise UsageError("retrieval reads image files; this index lists tfds examples")
    images = {i: _load_cell(paths[i], f.cell) for i in used}
    save_png(retrieval_grid(images, queries, neighbours, f.cell), f.output)


def _curves(f: VisualizeConfig) -> None:
    plot_curves(read_scalars(f.model_dir), f.output, f.width, f.height)


def run(config: VisualizeConfig) -> str:
    {"filters": _filters, "retrieval": _retrieval, "curves": _curves}[config.figure](config)
    print(config.output)
    return config.output


def main(argv=None) -> None:
    cli.main(PROGRAM, VisualizeConfig, run, module_name=PROGRAM, doc=__doc__, argv=argv,
             positional="figure")


if __name__ == "__main__":
    main()
