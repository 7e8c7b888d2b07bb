"""Features of a frozen network: the endpoints of a zoo model or of a SavedModel, pooled.

`extract_features(model, endpoints, dataset)` runs the network over an unbatched (image, label)
dataset in inference mode (BN moving statistics, no dropout, no gradient) and pools each
endpoint map [N, h, w, c] to [N, h', w', c] by adaptive average (or max) pooling
(`models.pooling`), flattened; vector endpoints are used as they are. The grid is
(h', w') = `models.pooling.grid_for(shape, pool_size, max_dims)`. The endpoint `pixels` is the
model input itself, a reference row.

A model is a keras.Model whose output is a dict of endpoints, or a
`serving.client.SavedModelClient` (an export).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from models import pooling
from runtime.errors import InvalidInput
from runtime.progress import Progress

PIXELS = "pixels"
MAX_DIMS = 9216


def endpoint_names(model) -> tuple[str, ...]:
    """The endpoints a model offers, `pixels` included."""
    names = getattr(model, "endpoints", None)
    if names is None:
        output = model.output
        if not isinstance(output, dict):
            raise ValueError(f"model {model.name} does not return a dict of endpoints")
        names = tuple(output)
    return (*names, PIXELS)


def check_endpoints(model, endpoints: Sequence[str]) -> None:
    """Raise ValueError naming the first endpoint the model does not have, and the valid ones."""
    valid = endpoint_names(model)
    for endpoint in endpoints:
        if endpoint not in valid:
            raise InvalidInput(f"unknown endpoint {endpoint!r} of {model.name}; choose from "
                               f"{', '.join(valid)}")


def model_input_shape(model) -> tuple[int, int, int]:
    """(H, W, C) of the images a model takes."""
    shape = tuple(model.input_shape[1:])
    if len(shape) != 3 or None in shape:
        raise InvalidInput(f"model {model.name} has no fixed image input shape: {shape}")
    return tuple(int(d) for d in shape)


@dataclass(frozen=True)
class Features:
    """Pooled features of one split: {endpoint: float32 [N, D]}, labels int64 [N], and the
    pooled shape (h', w', c) (or (D,)) of each endpoint."""

    values: dict[str, np.ndarray]
    labels: np.ndarray
    shapes: dict[str, tuple[int, ...]]


def extract_features(model, endpoints: Sequence[str], dataset: tf.data.Dataset, *,
                     pool: str = "avg", pool_size: int | None = None, max_dims: int = MAX_DIMS,
                     batch_size: int = 256) -> Features:
    """Run the frozen model over an unbatched (image, label) dataset and pool the endpoints."""
    check_endpoints(model, endpoints)
    wanted = [e for e in endpoints if e != PIXELS]

    def pooled(x):
        if x.shape.rank == 2:
            return x
        if x.shape.rank != 4:
            raise ValueError(f"endpoint of rank {x.shape.rank}; expected 2 or 4")
        return pooling.adaptive_pool(x, pooling.grid_for(x.shape[1:], pool_size, max_dims),
                                     pool)

    @tf.function(reduce_retracing=True)
    def forward(images):
        outputs = model(images, training=False) if wanted else {}
        result = {e: pooled(tf.cast(outputs[e], tf.float32)) for e in wanted}
        if PIXELS in endpoints:
            result[PIXELS] = pooled(images)
        return result

    values = {e: [] for e in endpoints}
    labels, shapes = [], {}
    bar = Progress(None, "extracting features", unit=" images", delay=5.0)
    for images, y in dataset.batch(batch_size).prefetch(2):
        out = forward(images)
        for e in endpoints:
            shapes[e] = tuple(out[e].shape[1:])
            values[e].append(out[e].numpy().reshape(len(y), -1))
        labels.append(y.numpy())
        bar.update(sum(map(len, labels)))
    bar.close()
    if not labels:
        raise ValueError("no examples to extract features from")
    return Features({e: np.concatenate(v) for e, v in values.items()}, np.concatenate(labels),
                    shapes)
