"""Spatial Contrasting (Hoffer, Hubara & Ailon 2017): patch sampling and the distance-ratio loss.

Protocol (SC Sec. 4 and Algorithm 1). A network maps a batch of N images to a feature map
f of shape [N, H, W, C] at some endpoint. From every image i two windows of h x w cells are
taken, each at its own uniformly random (row, column) offset, and turned into vectors
f_i^(1) (the anchor) and f_i^(2) (the contrast): averaged over the window to C values
(`pool="avg"`, the default) or flattened to h*w*C values (`pool="flatten"`). With

    Dist(i, j) = ||f_i^(1) - f_j^(2)||_2          (or its square, `squared=True`)

the loss of image i is the distance ratio of SC Eq. (4), a softmax over the batch:

    loss_i = -log( exp(-Dist(i, i)) / sum_j exp(-Dist(i, j)) )
           = logsumexp_j( Dist(i, i) - Dist(i, j) )

and the symmetric form (SC Sec. 4.1, "the final loss will be the average between these
estimations") averages it with the same term on the transposed matrix, i.e. with the
contrast f_i^(2) compared against every anchor f_j^(1).

Under `tf.distribute`, every replica holds its local b images of a global batch of B. The
contrasts (and, for the symmetric form, the anchors) of all replicas are gathered, so each
local image is compared against the whole global batch and its positive sits at column
`replica_offset(b) + i`. The returned per-example loss is for the LOCAL images [b]; averaged
over the global batch (`tf.nn.compute_average_loss(loss, global_batch_size=B)`) it equals
the single-device loss on the global batch, and so do the gradients once summed over
replicas, because the gather is differentiable (see `losses.cross_replica.all_gather`). The
sampler likewise draws the offsets of the global batch and keeps this replica's rows, so a
distributed step samples exactly the windows a single device would.

How a window becomes a vector is left open by the paper: it writes f^(m) = F(x^(m)), "the
features of a patch", and motivates SC by the global average pooling that aggregates the
spatial features of a region before classification (Sec. 4). The zoo averages each window.
Flattening compares the two windows cell by cell, and two windows at independent offsets are
shifted against each other, so the cells it compares show different parts of the image.
Measured at random init on nin_mnist's 7 x 7 `sc` map with 6 x 6 windows (BN in training
mode, batches of 128 digits, chance 0.8%; `python -m benchmarks.sc_windows`), the positive is
the nearest window of the batch, for flattened / averaged windows: always / always when the
windows coincide (a quarter of the pairs: trivial), 10% / 89% when they are shifted on one
axis (half of the pairs), 1.4% / 57% when shifted on both. With flattening, three quarters of
the pairs teach nearly nothing and a quarter is trivial. `pool="flatten"` remains, for
comparison.

Public API:
    patch_hw(patch_size, map_hw)                                  -> (h, w)
    patch_offsets(batch_size, map_hw, patch_size, seed)           -> int32 [N, 2, 2]
    sample_patch_pairs(feature_map, patch_size, seed, pool)       -> (p1, p2)
    pairwise_distances(anchors, contrasts, squared)               -> float32 [b, B]
    spatial_contrasting_loss(anchors, contrasts, squared, symmetric) -> float32 [b]
    patch_matching_accuracy(anchors, contrasts)                   -> float32 [b]
    SpatialContrastingLoss                                        keras.losses.Loss wrapper
    multi_endpoint_loss(endpoints, weights, patch_size, seed, ...) -> SCLossOutput
    endpoint_seed(seed, endpoint)                                 -> the seed used at endpoint
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import keras
import tensorflow as tf

from losses import SC_POOLS, cross_replica
from runtime.errors import InvalidInput

POOLS = SC_POOLS

PatchSize = float | Sequence[int]
Seed = tf.Tensor | Sequence[int]


# ----------------------------------------------------------------------------- sampling


def patch_hw(patch_size: PatchSize, map_hw: Sequence[int]) -> tuple[int, int]:
    """The window size (h, w) in cells for a map of (H, W) cells.

    `patch_size` is either an (h, w) pair of ints with 1 <= h <= H and 1 <= w <= W, or a float
    fraction `a` in (0, 1] of the map's AREA: each side keeps the fraction sqrt(a), rounded
    half up and clipped to at least one cell, i.e.
        h = clip(floor(sqrt(a) * H + 0.5), 1, H),   w = clip(floor(sqrt(a) * W + 0.5), 1, W).
    (SC Sec. 5: windows of about 30% of the image on STL10 and CIFAR-10, a = 0.3, and almost
    the whole image on MNIST.) A bare int is refused: "1" could mean one cell or the whole map.
    """
    big_h, big_w = (int(v) for v in map_hw)
    if isinstance(patch_size, bool):
        raise ValueError(f"patch_size must be an (h, w) pair or an area fraction; "
                         f"got {patch_size!r}")
    if isinstance(patch_size, float):
        if not 0.0 < patch_size <= 1.0 or math.isnan(patch_size):
            raise ValueError(f"patch_size as a float is an area fraction in (0, 1]; "
                             f"got {patch_size!r}")
        side = math.sqrt(patch_size)
        h = min(max(math.floor(side * big_h + 0.5), 1), big_h)
        w = min(max(math.floor(side * big_w + 0.5), 1), big_w)
        return h, w
    if isinstance(patch_size, int):
        raise ValueError(f"patch_size must be an (h, w) pair of ints or a float area fraction; "
                         f"got the bare int {patch_size!r}")
    try:
        h, w = patch_size
    except (TypeError, ValueError):
        raise ValueError(f"patch_size must be an (h, w) pair of ints or a float area fraction; "
                         f"got {patch_size!r}") from None
    if any(isinstance(v, bool) or int(v) != v for v in (h, w)):
        raise ValueError(f"patch_size (h, w) must hold ints; got {patch_size!r}")
    h, w = int(h), int(w)
    if not (1 <= h <= big_h and 1 <= w <= big_w):
        raise InvalidInput(f"patch_size {(h, w)} does not fit a {big_h}x{big_w} feature map "
                           f"(need 1 <= h <= {big_h}, 1 <= w <= {big_w})")
    return h, w


def _as_seed(seed: Seed) -> tf.Tensor:
    """A stateless-op seed: an int64 tensor of shape [2]."""
    if isinstance(seed, int | bool):
        raise ValueError(f"seed must be a pair of ints or a shape-[2] int tensor; got {seed!r}")
    seed = tf.convert_to_tensor(seed)
    if not seed.dtype.is_integer:
        raise ValueError(f"seed must hold integers; got dtype {seed.dtype.name}")
    if seed.shape.rank is not None and seed.shape.as_list() != [2]:
        raise ValueError(f"seed must have shape [2]; got shape {seed.shape.as_list()}")
    return tf.cast(seed, tf.int64)


def patch_offsets(batch_size: tf.Tensor | int, map_hw: Sequence[int], patch_size: PatchSize,
                  seed: Seed) -> tf.Tensor:
    """Random window offsets: int32 [N, 2, 2], `[n, k, 0]` the row and `[n, k, 1]` the column
    of window k in {0, 1} of image n.

    Every offset is uniform on its valid range, rows on [0, H - h] and columns on [0, W - w],
    and all 4N of them are independent: rows and columns come from two different stateless
    streams (`stateless_split` of `seed`). Deterministic for a given seed. Under a strategy the
    offsets of the whole global batch are drawn and this replica keeps its own rows, so they
    do not depend on how the batch is split.
    """
    big_h, big_w = (int(v) for v in map_hw)
    h, w = patch_hw(patch_size, (big_h, big_w))
    seed = _as_seed(seed)
    local = tf.cast(batch_size, tf.int32)
    if cross_replica.is_distributed():
        total = tf.reduce_sum(cross_replica.all_gather(tf.reshape(local, [1])))
        start = cross_replica.replica_offset(local)
    else:
        total, start = local, tf.constant(0, tf.int32)
    row_seed, col_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    rows = tf.random.stateless_uniform([total, 2], seed=row_seed, minval=0,
                                       maxval=big_h - h + 1, dtype=tf.int32)
    cols = tf.random.stateless_uniform([total, 2], seed=col_seed, minval=0,
                                       maxval=big_w - w + 1, dtype=tf.int32)
    return tf.stack([rows, cols], axis=-1)[start:start + local]


def sample_patch_pairs(feature_map: tf.Tensor, patch_size: PatchSize, seed: Seed,
                       pool: str = "avg") -> tuple[tf.Tensor, tf.Tensor]:
    """Two random windows per image of a feature map, as vectors.

    Args:
      feature_map: [N, H, W, C]; N may be unknown, H, W and C must be static.
      patch_size: (h, w) in cells, or a float fraction of the map's area (see `patch_hw`).
      seed: a pair of ints or a shape-[2] int tensor (stateless ops, so a training loop can
        pass a per-step seed); the same seed gives the same windows.
      pool: "avg" (the zoo's reading, module docstring) -> the mean over the window's cells, C
        values; "flatten" -> each window is its h*w*C cells in row-major (row, column,
        channel) order.

    Returns:
      (p1, p2), each [N, h*w*C] ("flatten") or [N, C] ("avg"), float32 (a bfloat16 or float16
      map of a mixed-precision network is cast before the average, which then sums in
      float32): p1[n] is the window at `patch_offsets(...)[n, 0]`, p2[n] the one at
      `[n, 1]`. The two windows of an image may overlap or even coincide.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")
    feature_map = tf.convert_to_tensor(feature_map)
    shape = feature_map.shape
    if shape.rank != 4:
        raise ValueError(f"feature_map must be [N, H, W, C]; got shape {shape}")
    if any(d is None for d in shape[1:]):
        raise ValueError(f"feature_map needs static H, W, C; got shape {shape}")
    big_h, big_w, channels = shape[1], shape[2], shape[3]
    h, w = patch_hw(patch_size, (big_h, big_w))
    n = tf.shape(feature_map)[0]
    offsets = patch_offsets(n, (big_h, big_w), (h, w), seed)
    rows = offsets[:, :, 0:1] + tf.range(h)[None, None, :]  # [N, 2, h]
    cols = offsets[:, :, 1:2] + tf.range(w)[None, None, :]  # [N, 2, w]
    # Gathers (not one-hot products) keep the windows bit-exact and the gradient sparse.
    windows = tf.gather(feature_map, rows, axis=1, batch_dims=1)  # [N, 2, h, W, C]
    windows = tf.gather(windows, cols, axis=3, batch_dims=2)  # [N, 2, h, w, C]
    windows = tf.cast(windows, tf.float32)
    if pool == "avg":
        vectors = tf.reduce_mean(windows, axis=[2, 3])
    else:
        vectors = tf.reshape(windows, [n, 2, h * w * channels])
    return vectors[:, 0], vectors[:, 1]


# ----------------------------------------------------------------------------- the loss


def _check_pair(anchors: tf.Tensor, contrasts: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Both as float32 [b, D] (the loss is always computed in float32)."""
    anchors = tf.convert_to_tensor(anchors)
    contrasts = tf.convert_to_tensor(contrasts)
    for name, x in (("anchors", anchors), ("contrasts", contrasts)):
        if x.shape.rank != 2:
            raise ValueError(f"{name} must be [batch, dim]; got shape {x.shape}")
        if not x.dtype.is_floating:
            raise ValueError(f"{name} must be floating point; got dtype {x.dtype.name}")
    if not anchors.shape.is_compatible_with(contrasts.shape):
        raise ValueError(f"anchors and contrasts must have the same shape; got "
                         f"{anchors.shape} and {contrasts.shape}")
    return tf.cast(anchors, tf.float32), tf.cast(contrasts, tf.float32)


def _safe_sqrt(x: tf.Tensor) -> tf.Tensor:
    """sqrt(x) for x >= 0 whose gradient at 0 is 0 (a subgradient of the norm), not inf/NaN."""
    positive = x > 0
    return tf.where(positive, tf.sqrt(tf.where(positive, x, tf.ones_like(x))), tf.zeros_like(x))


def _squared_distances(rows: tf.Tensor, columns: tf.Tensor, diagonal_sq: tf.Tensor,
                       positive: tf.Tensor, shift: tf.Tensor) -> tf.Tensor:
    """||rows_i - columns_j||^2 as [b, B], with the positives' entries set to `diagonal_sq`.

    The off-positive entries use ||x||^2 + ||y||^2 - 2 x.y (one matmul instead of a [b, B, D]
    difference tensor), after subtracting a common `shift` from both sides: distances do not
    change, but the cancellation error, which grows with the norms, shrinks. The positives
    are computed exactly by the caller, so coinciding windows give exactly 0.
    """
    x = rows - shift
    y = columns - shift
    sq = (tf.reduce_sum(tf.square(x), axis=1)[:, None]
          + tf.reduce_sum(tf.square(y), axis=1)[None, :]
          - 2.0 * tf.matmul(x, y, transpose_b=True))
    sq = tf.maximum(sq, 0.0)
    return tf.where(positive, diagonal_sq[:, None], sq)


def _gathered(anchors: tf.Tensor, contrasts: tf.Tensor, gather_anchors: bool):
    """Gathered contrasts (and anchors), the positive mask [b, B] and the shift."""
    local = tf.shape(anchors)[0]
    contrasts_all = cross_replica.all_gather(contrasts)
    anchors_all = cross_replica.all_gather(anchors) if gather_anchors else None
    offset = cross_replica.replica_offset(local)
    positive = tf.cast(tf.one_hot(offset + tf.range(local), tf.shape(contrasts_all)[0],
                                  dtype=tf.int32), tf.bool)
    # The same shift on every replica (the gathered mean), so sharding does not change it.
    shift = tf.stop_gradient(tf.reduce_mean(contrasts_all, axis=0))
    return contrasts_all, anchors_all, positive, shift


def pairwise_distances(anchors: tf.Tensor, contrasts: tf.Tensor,
                       squared: bool = False) -> tf.Tensor:
    """Dist[i, j] = ||anchors_i - contrasts_j|| (squared if asked): float32 [b, B].

    `anchors` and `contrasts` are [b, D]; the columns run over the contrasts of all replicas
    (B = global batch; B = b on one device). The gradient at a zero distance is 0.
    """
    anchors, contrasts = _check_pair(anchors, contrasts)
    contrasts_all, _, positive, shift = _gathered(anchors, contrasts, gather_anchors=False)
    positive_sq = tf.reduce_sum(tf.square(anchors - contrasts), axis=1)
    sq = _squared_distances(anchors, contrasts_all, positive_sq, positive, shift)
    return sq if squared else _safe_sqrt(sq)


def _log_sum_exp(x: tf.Tensor) -> tf.Tensor:
    """log(sum_j exp(x[i, j])) over axis 1, as m + log1p(sum_{j != k} exp(x_j - m)) with
    k = argmax and m = x_k.

    Unlike max + log(sum(...)), this keeps full relative precision when one term dominates
    (a loss of 1e-11 is not rounded to 0 by 1 + 1e-11 == 1). m is gathered at k rather than
    taken with reduce_max, so ties still receive the exact softmax gradient.
    """
    k = tf.argmax(x, axis=1, output_type=tf.int32)
    m = tf.gather(x, k[:, None], batch_dims=1)  # [b, 1]
    is_k = tf.cast(tf.one_hot(k, tf.shape(x)[1], dtype=tf.int32), tf.bool)
    rest = tf.reduce_sum(tf.where(is_k, tf.zeros_like(x), tf.exp(x - m)), axis=1)
    return m[:, 0] + tf.math.log1p(rest)


def _ratio_loss(dist: tf.Tensor, positive: tf.Tensor) -> tf.Tensor:
    """-log_softmax(-dist)[i, pos(i)] = logsumexp_j(dist[i, pos(i)] - dist[i, j]).

    Written with the positive's distance inside the log-sum-exp, so two large distances are
    subtracted before anything is exponentiated: the loss stays finite and keeps its absolute
    precision when every distance is large.
    """
    dist_pos = tf.reduce_sum(tf.where(positive, dist, tf.zeros_like(dist)), axis=1)
    return _log_sum_exp(dist_pos[:, None] - dist)


def spatial_contrasting_loss(anchors: tf.Tensor, contrasts: tf.Tensor, squared: bool = False,
                             symmetric: bool = True) -> tf.Tensor:
    """The per-example SC distance-ratio loss (SC Eq. 3-4), float32 [b].

    Args:
      anchors: [b, D], f_i^(1), the first window of each local image.
      contrasts: [b, D], f_i^(2), the second window of the same images, in the same order.
      squared: use ||.||^2 instead of the paper's ||.||_2.
      symmetric: average with the transposed term (SC Sec. 4.1).

    Returns:
      loss_i = logsumexp_j(Dist[i, i] - Dist[i, j]) = -log_softmax(-Dist[i, :])[i] with
      Dist[i, j] = ||anchors_i - contrasts_j|| over the contrasts j of the whole (global)
      batch; with `symmetric`, 0.5 * (loss_i + logsumexp_j(Dist[i, i] - Dist[j, i])), the
      second term comparing contrasts_i with every anchor. Under a strategy, i runs over this
      replica's images and j over all replicas' (module docstring); the batch mean of loss_i
      is the paper's L_SC.
    """
    anchors, contrasts = _check_pair(anchors, contrasts)
    contrasts_all, anchors_all, positive, shift = _gathered(anchors, contrasts, symmetric)
    # The positives' distances are computed from the difference itself: exact, and exactly 0
    # when the two windows of an image coincide.
    positive_sq = tf.reduce_sum(tf.square(anchors - contrasts), axis=1)

    def distances(rows, columns):
        sq = _squared_distances(rows, columns, positive_sq, positive, shift)
        return sq if squared else _safe_sqrt(sq)

    loss = _ratio_loss(distances(anchors, contrasts_all), positive)
    if symmetric:
        loss = 0.5 * (loss + _ratio_loss(distances(contrasts, anchors_all), positive))
    return loss


def patch_matching_accuracy(anchors: tf.Tensor, contrasts: tf.Tensor) -> tf.Tensor:
    """1.0 where an anchor's nearest contrast (over the global batch) is its own, else 0.0.

    float32 [b], per local example, so the global mean is
    `tf.nn.compute_average_loss(acc, global_batch_size=B)` like the loss. Ties go to the
    lowest index. Not differentiable (it is a statistic to log).
    """
    anchors, contrasts = _check_pair(anchors, contrasts)
    anchors, contrasts = tf.stop_gradient(anchors), tf.stop_gradient(contrasts)
    contrasts_all, _, positive, shift = _gathered(anchors, contrasts, gather_anchors=False)
    positive_sq = tf.reduce_sum(tf.square(anchors - contrasts), axis=1)
    sq = _squared_distances(anchors, contrasts_all, positive_sq, positive, shift)
    nearest = tf.argmin(sq, axis=1, output_type=tf.int32)
    own = tf.argmax(tf.cast(positive, tf.int32), axis=1, output_type=tf.int32)
    return tf.cast(tf.equal(nearest, own), tf.float32)


# ----------------------------------------------------------------------------- wrappers


@keras.saving.register_keras_serializable(package="losses")
class SpatialContrastingLoss(keras.losses.Loss):
    """`spatial_contrasting_loss` as a Keras loss: `loss(contrasts, anchors)`.

    `y_true` holds the contrasts [b, D] and `y_pred` the anchors [b, D]. With the default
    reduction the result is the mean over the LOCAL batch; under a strategy use
    `reduction=None` and average with `tf.nn.compute_average_loss` over the global batch.
    """

    def __init__(self, squared: bool = False, symmetric: bool = True,
                 reduction: str | None = "sum_over_batch_size",
                 name: str = "spatial_contrasting", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.squared = bool(squared)
        self.symmetric = bool(symmetric)

    def call(self, y_true, y_pred):
        return spatial_contrasting_loss(y_pred, y_true, squared=self.squared,
                                        symmetric=self.symmetric)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(squared=self.squared, symmetric=self.symmetric)
        return config


class SCLossOutput(NamedTuple):
    """Result of `multi_endpoint_loss`; every tensor is float32 [b] (per local example)."""

    total: tf.Tensor  # sum_k weight_k * losses[k]
    losses: dict[str, tf.Tensor]  # endpoint -> spatial_contrasting_loss at that endpoint
    accuracy: dict[str, tf.Tensor]  # endpoint -> patch_matching_accuracy at that endpoint


def endpoint_seed(seed: Seed, endpoint: str) -> tf.Tensor:
    """The seed used at `endpoint`: `seed` folded with a fixed hash (CRC-32) of its name, so
    adding or removing an endpoint never changes the windows sampled at the others."""
    return tf.random.experimental.stateless_fold_in(
        _as_seed(seed), zlib.crc32(endpoint.encode()) & 0x7FFFFFFF)


def multi_endpoint_loss(endpoints: Mapping[str, tf.Tensor], weights: Mapping[str, float],
                        patch_size: PatchSize | Mapping[str, PatchSize], seed: Seed,
                        pool: str = "avg", squared: bool = False,
                        symmetric: bool = True) -> SCLossOutput:
    """SC at several endpoints (SC Sec. 4.2: "SC can be used at multiple layers"), weighted.

    Args:
      endpoints: name -> feature map [b, H, W, C] (e.g. a model's output dict; extra keys are
        ignored).
      weights: name -> weight >= 0 for every endpoint that carries the loss (at least one).
      patch_size: one patch size for all, or name -> patch size (see `patch_hw`).
      seed: as in `sample_patch_pairs`; endpoint k samples with `endpoint_seed(seed, k)`.
      pool, squared, symmetric: as in `sample_patch_pairs` / `spatial_contrasting_loss`.

    Returns:
      SCLossOutput(total = sum_k weights[k] * loss_k, losses, accuracy), each [b].
    """
    if not weights:
        raise ValueError("weights must name at least one endpoint")
    total = None
    losses, accuracy = {}, {}
    for name in sorted(weights):
        weight = float(weights[name])
        if not weight >= 0.0 or math.isinf(weight):
            raise ValueError(f"weight of endpoint {name!r} must be finite and >= 0; "
                             f"got {weights[name]!r}")
        if name not in endpoints:
            raise InvalidInput(f"endpoint {name!r} not found; available: "
                               f"{', '.join(sorted(endpoints))}")
        if isinstance(patch_size, Mapping):
            if name not in patch_size:
                raise InvalidInput(f"no patch_size for endpoint {name!r}")
            size = patch_size[name]
        else:
            size = patch_size
        anchors, contrasts = sample_patch_pairs(endpoints[name], size,
                                                endpoint_seed(seed, name), pool=pool)
        losses[name] = spatial_contrasting_loss(anchors, contrasts, squared=squared,
                                                symmetric=symmetric)
        accuracy[name] = patch_matching_accuracy(anchors, contrasts)
        term = weight * losses[name]
        total = term if total is None else total + term
    return SCLossOutput(total, losses, accuracy)
