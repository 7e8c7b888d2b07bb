"""Pooling of an endpoint into a feature vector: the one definition the export, the probes
and the figures share.

A pooling is named by a string:

    none       the endpoint as it is: [N, h, w, c] or [N, d]
    flatten    [N, h * w * c]
    avg, max   global average / max over h, w: [N, c]
    maxKxL     adaptive max / average pooling to a K x L grid, flattened in (row, column,
    avgKxL     channel) order: [N, K * L * c]

Adaptive pooling cuts an axis of length h into K bins; bin i covers

    rows floor(i h / K) .. ceil((i + 1) h / K) - 1,

so bins overlap by a row when K does not divide h, and K = h gives each cell its own bin
(the identity). Every pooled output is float32.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import tensorflow as tf

from runtime.errors import InvalidInput

GLOBAL_POOLINGS = ("none", "flatten", "avg", "max")
MODES = ("avg", "max")
_ADAPTIVE = re.compile(r"^(max|avg)(\d+)x(\d+)$")


def adaptive(mode: str, rows: int, cols: int) -> str:
    """The name of adaptive `mode` pooling to a rows x cols grid, e.g. "max6x6"."""
    if mode not in MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; choose one of {', '.join(MODES)}")
    return f"{mode}{rows}x{cols}"


def parse_adaptive(pooling: str) -> tuple[str, int, int] | None:
    """("max" | "avg", K, L) for an adaptive pooling name, None for any other string."""
    match = _ADAPTIVE.match(pooling)
    return None if match is None else (match.group(1), int(match.group(2)), int(match.group(3)))


def check_pooling(pooling: str, shape: Sequence[int]) -> None:
    """Raise ValueError unless `pooling` applies to an endpoint of shape (h, w, c) or (d,)."""
    cells = parse_adaptive(pooling)
    if pooling not in GLOBAL_POOLINGS and cells is None:
        raise InvalidInput(f"unknown pooling {pooling!r}; choose none, flatten, avg, max, "
                           "maxKxL or avgKxL (adaptive pooling to a K x L grid)")
    if (pooling in MODES or cells) and len(shape) != 3:
        raise InvalidInput(f"pooling {pooling!r} needs a feature map [h, w, c]; "
                           f"the endpoint has shape {tuple(shape)}")
    if cells:
        _, rows, cols = cells
        if not 1 <= rows <= shape[0] or not 1 <= cols <= shape[1]:
            raise InvalidInput(f"pooling {pooling!r} needs 1 <= K <= {shape[0]} and "
                               f"1 <= L <= {shape[1]} for a {shape[0]}x{shape[1]} map")


def adaptive_bins(size: int, cells: int) -> list[tuple[int, int]]:
    """[(start, stop)] per bin i: floor(i size / cells), ceil((i + 1) size / cells)."""
    return [((i * size) // cells, -((-(i + 1) * size) // cells)) for i in range(cells)]


def adaptive_pool(x: tf.Tensor, cells: tuple[int, int], mode: str = "avg") -> tf.Tensor:
    """[N, h, w, c] -> [N, K, L, c]: the mean (or max) of each bin; identity when (K, L) is
    (h, w). The shape other than N must be static."""
    if mode not in MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; choose one of {', '.join(MODES)}")
    h, w = int(x.shape[1]), int(x.shape[2])
    if (h, w) == tuple(cells):
        return x
    reduce = tf.reduce_mean if mode == "avg" else tf.reduce_max
    rows = []
    for r0, r1 in adaptive_bins(h, cells[0]):
        bins = [reduce(x[:, r0:r1, c0:c1, :], axis=(1, 2)) for c0, c1 in adaptive_bins(w, cells[1])]
        rows.append(tf.stack(bins, axis=1))
    return tf.stack(rows, axis=1)


def pool_features(x: tf.Tensor, pooling: str) -> tf.Tensor:
    """Apply `pooling` (see the module docstring) to a batch of endpoint values; float32 out.

    Shapes other than the batch axis must be static (they are: the model input size is).
    """
    x = tf.cast(x, tf.float32)
    if pooling == "none":
        return x
    if pooling == "flatten":
        return tf.reshape(x, [-1, math.prod(int(d) for d in x.shape[1:])])
    if pooling == "avg":
        return tf.reduce_mean(x, axis=[1, 2])
    if pooling == "max":
        return tf.reduce_max(x, axis=[1, 2])
    cells = parse_adaptive(pooling)
    if cells is None:
        raise ValueError(f"unknown pooling {pooling!r}")
    mode, rows, cols = cells
    pooled = adaptive_pool(x, (rows, cols), mode)
    return tf.reshape(pooled, [-1, rows * cols * int(x.shape[3])])


def grid_for(shape: Sequence[int], pool_size: int | None = None, max_dims: int = 9216
             ) -> tuple[int, int]:
    """The adaptive grid (K, L) for a map of shape (h, w, c): min(h, p), min(w, p) with
    p = pool_size, or the largest p with p * p * c <= max_dims (at least 1). 9216 = 6 x 6 x
    256, AlexNet's pool5, about the size Zhang et al. 2016 resize conv maps to."""
    h, w, c = (int(d) for d in shape)
    if pool_size is None:
        p = max(1, math.isqrt(max(max_dims, 1) // c))
    else:
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1; got {pool_size}")
        p = pool_size
    return min(h, p), min(w, p)
