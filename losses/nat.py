"""Noise As Targets (Bojanowski & Joulin 2017, Sec. 3 and Algorithm 1).

NAT learns features by mapping the images onto fixed random targets on the unit sphere:

    min_theta  min_{P in permutations}  (1/n) sum_i ||f_theta(x_i) - c_{P(i)}||^2

where the n targets `c_k` are drawn uniformly on the d-dimensional unit sphere and `P` is a
one-to-one assignment of images to targets. The assignment is optimised stochastically: in a
batch of b distinct images, the images may only trade the b targets they currently hold, which
is a b x b linear assignment problem solved exactly (Hungarian-type solver, O(b^3)).

The pieces:

    sphere_targets(target_ids, dim, seed)  -> float32 [b, dim]   rows of C, regenerated on demand
    onehot_targets(target_ids, dim)        -> float32 [b, dim]   the discrete baseline's rows
    optimal_assignment(cost)               -> int32 [b]          argmin_perm sum_i cost[i, perm[i]]
    nat_loss(features, targets)            -> float32 [b]        ||z_i - c_i||^2
    NoiseAsTargets(num_examples, dim, seed, scope)               the assignment state and the step

Targets are never stored: row k of C is a function of (seed, k) alone, so the only state is one
int32 per image, `assignment[i]` = the target of image i, always a permutation of [0, n).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.optimize
import tensorflow as tf

from losses import NAT_SCOPES, NAT_TARGETS, cross_replica

__all__ = ["SCOPES", "NoiseAsTargets", "nat_loss", "onehot_targets", "optimal_assignment",
           "sphere_targets"]

SCOPES = NAT_SCOPES

# SplitMix64 constants (Steele, Lea & Flood 2014): the golden-ratio increment and the two
# multipliers of its finaliser, a bijective 64-bit mixer that passes BigCrush.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# A second odd constant so that (seed, id) pairs are combined asymmetrically.
_SEED_MULT = np.uint64(0xD1B54A32D192ED03)
_MAX_SEED = 2**63
# Pairs per row are padded to a multiple of this (16 floats: one AVX-512 register).
_PACKET = 16


def _mix64(z: tf.Tensor) -> tf.Tensor:
    """SplitMix64 finaliser on a uint64 tensor (elementwise, wrapping arithmetic)."""
    shift = tf.bitwise.right_shift
    xor = tf.bitwise.bitwise_xor
    z = xor(z, shift(z, tf.constant(30, tf.uint64))) * tf.constant(_MIX1)
    z = xor(z, shift(z, tf.constant(27, tf.uint64))) * tf.constant(_MIX2)
    return xor(z, shift(z, tf.constant(31, tf.uint64)))


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not 0 <= int(seed) < _MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return int(seed)


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def sphere_targets(target_ids: tf.Tensor, dim: int, seed: int) -> tf.Tensor:
    """Rows `target_ids` of the NAT target matrix C: float32 [b, dim], each uniform on S^{dim-1}.

    Row k depends on (seed, k) only, never on the batch it is asked in, its position there or
    the device, so C can be regenerated for any batch and never exists as an n x dim array.

    Construction (counter-based, vectorised over the batch, no per-row op):
      key_k  = mix(seed * A + mix(k + G))                      a 64-bit key per row
      w_kj   = mix(key_k + j * G),  j = 1..P                   SplitMix64 stream of row k
      u1, u2 = bits 41..63 and 16..39 of w_kj, as (m + 1/2) / 2^23 and m / 2^24
      r, t   = sqrt(-2 log u1), 2 pi u2
      g      = (r cos t [P values], r sin t [P values])[:dim]  Box-Muller: iid N(0, 1)
      c_k    = g / ||g||                                       a Gaussian direction is uniform
    with P = ceil(dim / 2) rounded up to a multiple of 16,
    `mix` the SplitMix64 finaliser, G its golden-ratio increment, A an odd constant. Integers are
    bit-exact everywhere. The float part is written so that a row's bits do not depend on the
    batch, its position or eager vs graph execution on a given kind of device (whole vector
    packets, a fixed-order norm); across device kinds (CPU vs GPU) the transcendental
    functions may differ in the last bit. The 23-bit u1 truncates each Gaussian coordinate at
    |g| < 5.8, which a unit target does not notice.

    Args:
      target_ids: integer [b], ids in [0, 2**63) (int32 or int64).
      dim: the target dimension d (NAT used d = 2048).
      seed: an int in [0, 2**63); different seeds give independent target matrices.

    Returns:
      float32 [b, dim], unit-norm rows.
    """
    dim = _check_positive("dim", dim)
    seed = _check_seed(seed)
    ids = tf.convert_to_tensor(target_ids)
    if not ids.dtype.is_integer:
        raise ValueError(f"target_ids must be integers, got dtype {ids.dtype.name}")
    if ids.shape.rank is not None and ids.shape.rank != 1:
        raise ValueError(f"target_ids must have rank 1 [b], got shape {ids.shape}")
    ids = tf.cast(tf.cast(ids, tf.int64), tf.uint64)

    row_key = _mix64(
        tf.constant(np.uint64(seed)) * tf.constant(_SEED_MULT) + _mix64(ids + tf.constant(_GOLDEN))
    )
    # Whole packets of pairs per row: every element then takes the same vectorised code path
    # for log/cos/sin whatever its position, which keeps a row bit-identical across batches.
    pairs = -(-((dim + 1) // 2) // _PACKET) * _PACKET
    counters = tf.cast(tf.range(1, pairs + 1, dtype=tf.int64), tf.uint64) * tf.constant(_GOLDEN)
    words = _mix64(row_key[:, None] + counters[None, :])  # [b, pairs]

    gauss = _box_muller(words)
    if 2 * pairs != dim:
        gauss = gauss[:, :dim]
    # divide_no_nan rather than `/`: graph optimisation rewrites x / sqrt(y) into x * rsqrt(y),
    # whose vectorised and scalar kernels differ in the last bit (the norm is never 0).
    return tf.math.divide_no_nan(gauss, tf.sqrt(_row_sum_fixed_order(tf.square(gauss))))


def _box_muller(words: tf.Tensor) -> tf.Tensor:
    """uint64 words [b, P] -> float32 N(0, 1) values [b, 2P] (the construction of
    `sphere_targets`: bits 41..63 and 16..39 of each word give u1, u2)."""
    # 23 and 24 bits convert exactly to float32, and (hi + 1/2) / 2^23 is exact and inside (0, 1).
    hi = tf.cast(tf.bitwise.right_shift(words, tf.constant(41, tf.uint64)), tf.float32)
    lo = tf.cast(
        tf.bitwise.bitwise_and(
            tf.bitwise.right_shift(words, tf.constant(16, tf.uint64)),
            tf.constant(np.uint64(0xFFFFFF)),
        ),
        tf.float32,
    )
    u1 = (hi + 0.5) * (2.0**-23)  # log(u1) < 0: the radius is never 0
    theta = lo * (2.0 * math.pi * 2.0**-24)
    radius = tf.sqrt(-2.0 * tf.math.log(u1))
    return tf.concat([radius * tf.cos(theta), radius * tf.sin(theta)], axis=1)


def onehot_targets(target_ids: tf.Tensor, dim: int) -> tf.Tensor:
    """Rows `target_ids` of the discrete target matrix: float32 [b, dim], row k = e_(k mod dim).

    NAT Sec. 4.1 ("continuous versus discrete representations") compares the sphere targets
    with elements of the canonical basis of a k-dimensional space, the matrix C holding n / k
    replications of the k basis vectors (balanced clusters); here k = dim and target k is basis
    vector k mod dim, so a permutation of the n ids is a balanced assignment to the k clusters.
    """
    dim = _check_positive("dim", dim)
    ids = tf.cast(tf.convert_to_tensor(target_ids), tf.int64)
    return tf.one_hot(tf.math.floormod(ids, dim), dim, dtype=tf.float32)


def _row_sum_fixed_order(x: tf.Tensor) -> tf.Tensor:
    """Row sums [b, 1] of x [b, d] by a pairwise tree of elementwise adds.

    A reduction kernel may order its additions by the batch size and thread count; a tree of
    IEEE adds gives the same bits for a row wherever and with whatever it is computed.
    """
    width = int(x.shape[-1])
    padded = 1 << (width - 1).bit_length()
    if padded != width:
        x = tf.pad(x, [[0, 0], [0, padded - width]])
    while padded > 1:
        padded //= 2
        x = x[:, :padded] + x[:, padded:]
    return x


def _solve_assignment(cost: np.ndarray) -> np.ndarray:
    cost = np.asarray(cost)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"optimal_assignment needs a square [b, b] cost, got shape {cost.shape}")
    if not np.all(np.isfinite(cost)):
        # Non-finite features (a diverged step) leave the targets where they are; the training
        # loop sees the non-finite loss and stops before anything is saved.
        return np.arange(cost.shape[0], dtype=np.int32)
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    # For a square matrix scipy returns rows = 0..b-1 in order; keep the pairing explicit anyway.
    perm = np.empty(cost.shape[0], np.int32)
    perm[rows] = cols
    return perm


def optimal_assignment(cost: tf.Tensor) -> tf.Tensor:
    """The permutation minimising `sum_i cost[i, perm[i]]`: int32 [b], `perm[i]` = row i's column.

    Solved exactly by `scipy.optimize.linear_sum_assignment` (a shortest augmenting path
    Hungarian-type solver, O(b^3)) through `tf.py_function`, so it runs eagerly, inside
    `tf.function` and inside `strategy.run` alike (not in an exported SavedModel). The cost is
    behind `stop_gradient`: the permutation is a discrete choice with no gradient.

    Args:
      cost: float [b, b].

    Returns:
      int32 [b], a permutation of [0, b), with the static batch size of `cost` when known.
    """
    cost = tf.stop_gradient(tf.convert_to_tensor(cost))
    if not (cost.dtype.is_floating or cost.dtype.is_integer):
        raise ValueError(f"cost must be a real matrix, got dtype {cost.dtype.name}")
    shape = cost.shape
    if shape.rank is not None:
        if shape.rank != 2:
            raise ValueError(f"cost must be a square [b, b] matrix, got shape {shape}")
        if shape[0] is not None and shape[1] is not None and shape[0] != shape[1]:
            raise ValueError(f"cost must be a square [b, b] matrix, got shape {shape}")
    perm = tf.py_function(_solve_assignment, [cost], Tout=tf.int32, name="optimal_assignment")
    perm.set_shape(shape[:1] if shape.rank is not None else [None])
    return perm


def nat_loss(features: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
    """The NAT square loss per example: float32 [b], `loss_i = ||z_i - c_i||^2`.

    Args:
      features: float [b, d], the unit-norm embeddings z (any float dtype; computed in float32).
      targets: float [b, d], the targets assigned to those images (no gradient flows to them).

    Returns:
      float32 [b]. The training loop averages it over the global batch
      (`tf.nn.compute_average_loss`).
    """
    z = tf.cast(features, tf.float32)
    c = tf.stop_gradient(tf.cast(targets, tf.float32))
    if z.shape.rank is not None and z.shape.rank != 2:
        raise ValueError(f"features must be [b, d], got shape {z.shape}")
    if not z.shape.is_compatible_with(c.shape):
        raise ValueError(f"features {z.shape} and targets {c.shape} must have the same shape")
    return tf.reduce_sum(tf.square(z - c), axis=1)


def _pairwise_sq_dist(z: tf.Tensor, c: tf.Tensor) -> tf.Tensor:
    """[b, m] matrix of ||z_i - c_j||^2, without gradient."""
    z = tf.stop_gradient(z)
    cross = tf.matmul(z, c, transpose_b=True)
    return (
        tf.reduce_sum(tf.square(z), axis=1)[:, None]
        + tf.reduce_sum(tf.square(c), axis=1)[None, :]
        - 2.0 * cross
    )


class NoiseAsTargets(tf.Module):
    """The NAT assignment state and the per-step target lookup and re-assignment.

    State: `assignment`, an int32 variable [n] that is always a permutation of [0, n);
    `assignment[i]` is the id of image i's target, whose vector is
    `sphere_targets([assignment[i]], dim, seed)`. It starts as a permutation seeded by `seed`
    and is checkpointed with the module (`tf.train.Checkpoint(nat=module)`).

    Step protocol, `per_example_loss, stats = module(indices, features, reassign)`:
      1. ids = assignment[indices], c = C[ids]                      (the batch's targets)
      2. if reassign: perm = argmin_P sum_i ||z_i - c_P(i)||^2 over permutations of the batch
         (Hungarian, on a stop_gradient cost); ids <- ids[perm], c <- c[perm];
         assignment[indices] <- ids                                 (images trade targets)
      3. loss_i = ||z_i - c_i||^2 against the (new) targets.
    The features come from the caller's single forward pass; gradients flow only through them.
    Images only exchange targets they hold, so the assignment stays a bijection.

    Under tf.distribute (create the module inside `strategy.scope()`):
      - scope="replica": each replica solves its own b x b problem (scales linearly).
      - scope="global": the global batch's features and target ids are gathered from all
        replicas, one B x B problem is solved, and each replica takes its rows. Only replica 0
        of the cluster solves it; the others receive its permutation by a collective.
      In both scopes every replica gathers the global batch's indices and new target ids and
      writes that same global update to its own copy of `assignment` (aggregation NONE writes
      the local copy in replica context, with no merge_call), so the copies stay identical, on
      MirroredStrategy and MultiWorkerMirroredStrategy alike.
      With scope="global" and a tensor `reassign`, the features are gathered every step (a
      collective cannot sit inside a tf.cond); a Python-bool or constant `reassign` skips it.

    A batch with a repeated index (within a replica or across replicas), or an index outside
    [0, n), raises `tf.errors.InvalidArgumentError`: trading targets within such a batch would
    break the bijection. Batch with drop_remainder after a per-epoch shuffle so it never happens.
    """

    def __init__(self, num_examples: int, dim: int, seed: int, scope: str = "replica",
                 name: str | None = None, targets: str = "sphere") -> None:
        """Args:
          num_examples: n, the number of images (and of targets).
          dim: d, the target and feature dimension.
          seed: int in [0, 2**63); seeds the targets and the initial permutation.
          scope: "replica" (one b x b problem per replica) or "global" (one B x B problem).
          targets: "sphere" (`sphere_targets`, the method) or "onehot" (`onehot_targets`, the
            discrete baseline of NAT Sec. 4.1).
        """
        super().__init__(name=name or "noise_as_targets")
        self.num_examples = _check_positive("num_examples", num_examples)
        if self.num_examples >= 2**31:
            raise ValueError(f"num_examples must be < 2**31 (int32 ids), got {num_examples}")
        self.dim = _check_positive("dim", dim)
        self.seed = _check_seed(seed)
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if targets not in NAT_TARGETS:
            raise ValueError(f"targets must be one of {', '.join(NAT_TARGETS)}, got {targets!r}")
        self.scope = scope
        self.kind = targets
        initial = np.random.default_rng(self.seed).permutation(self.num_examples).astype(np.int32)
        # Aggregation NONE: in replica context each replica writes its own copy. Every replica
        # writes the same gathered global update, which keeps the copies identical without a
        # merge_call (a merge_call cannot run inside tf.cond under MirroredStrategy).
        self.assignment = tf.Variable(
            initial,
            trainable=False,
            name="assignment",
            dtype=tf.int32,
            synchronization=tf.VariableSynchronization.ON_WRITE,
            aggregation=tf.VariableAggregation.NONE,
        )

    def vectors(self, target_ids: tf.Tensor) -> tf.Tensor:
        """The target vectors of target ids: float32 [b, dim]."""
        if self.kind == "onehot":
            return onehot_targets(target_ids, self.dim)
        return sphere_targets(target_ids, self.dim, self.seed)

    def targets(self, indices: tf.Tensor) -> tf.Tensor:
        """The current targets of images `indices`: float32 [b, dim]."""
        return self.vectors(tf.gather(self.assignment, indices))

    def _validate(self, indices: tf.Tensor, features: tf.Tensor) -> None:
        if indices.shape.rank is not None and indices.shape.rank != 1:
            raise ValueError(f"indices must be [b], got shape {indices.shape}")
        if features.shape.rank is not None and features.shape.rank != 2:
            raise ValueError(f"features must be [b, dim], got shape {features.shape}")
        if features.shape[-1] is not None and features.shape[-1] != self.dim:
            raise ValueError(
                f"features have dimension {features.shape[-1]}, NoiseAsTargets has dim {self.dim}"
            )
        if not indices.shape[:1].is_compatible_with(features.shape[:1]):
            raise ValueError(
                f"indices {indices.shape} and features {features.shape} disagree on the batch"
            )

    def _check_indices(self, global_indices: tf.Tensor) -> list[tf.Operation]:
        """Asserts that the global batch's indices are distinct and inside [0, n)."""
        in_range = tf.reduce_all(
            (global_indices >= 0) & (global_indices < self.num_examples)
        )
        ordered = tf.sort(global_indices)
        distinct = tf.reduce_all(ordered[1:] != ordered[:-1])
        return [
            tf.debugging.Assert(
                in_range,
                [f"NoiseAsTargets: an index is outside [0, {self.num_examples}); min/max:",
                 tf.reduce_min(global_indices), tf.reduce_max(global_indices)],
                name="indices_in_range",
            ),
            tf.debugging.Assert(
                distinct,
                ["NoiseAsTargets: repeated index in the (global) batch; images may only trade "
                 "targets within a batch of distinct images (batch with drop_remainder after "
                 "a shuffle, repeat after batching). Sorted indices:", ordered],
                summarize=32,
                name="indices_distinct",
            ),
        ]

    def __call__(self, indices: tf.Tensor, features: tf.Tensor,
                 reassign: tf.Tensor | bool) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """One NAT step on this replica's batch.

        Args:
          indices: int [b], the images' dataset indices, distinct across the global batch.
          features: float [b, dim], unit-norm embeddings from the caller's forward pass.
          reassign: bool scalar (tensor or Python bool): re-assign targets within the batch.

        Returns:
          per_example_loss: float32 [b], `||z_i - c_i||^2` against the (re-assigned) targets.
          stats: float32 scalars over this replica's batch:
            "reassigned_fraction": fraction of images whose target changed;
            "loss_before": mean loss against the targets held before this step;
            "loss_after": mean of per_example_loss.
        """
        indices = tf.cast(tf.convert_to_tensor(indices), tf.int32)
        features = tf.cast(tf.convert_to_tensor(features), tf.float32)
        self._validate(indices, features)
        static_reassign = tf.get_static_value(tf.convert_to_tensor(reassign, tf.bool))
        reassign = tf.convert_to_tensor(reassign, tf.bool)

        global_indices = cross_replica.all_gather(indices)
        with tf.control_dependencies(self._check_indices(global_indices)):
            ids = tf.gather(self.assignment, indices)
        targets = self.vectors(ids)
        batch = tf.shape(indices)[0]

        if static_reassign is not None and not static_reassign:
            new_ids, new_targets = ids, targets
        elif self.scope == "replica":
            new_ids, new_targets = self._reassign_replica(ids, features, targets, reassign,
                                                          static_reassign, batch)
        else:
            new_ids, new_targets = self._reassign_global(ids, features, reassign,
                                                         static_reassign, batch)

        if static_reassign is None or static_reassign:
            # The same global update on every replica keeps the copies identical.
            global_new_ids = cross_replica.all_gather(new_ids)
            self.assignment.scatter_update(tf.IndexedSlices(global_new_ids, global_indices))

        per_example_loss = nat_loss(features, new_targets)
        loss_before = nat_loss(features, targets)
        stats = {
            "reassigned_fraction": tf.reduce_mean(tf.cast(tf.not_equal(new_ids, ids), tf.float32)),
            "loss_before": tf.reduce_mean(loss_before),
            "loss_after": tf.reduce_mean(per_example_loss),
        }
        return per_example_loss, stats

    def _reassign_replica(self, ids, features, targets, reassign, static_reassign, batch):
        def solve():
            return optimal_assignment(_pairwise_sq_dist(features, targets))

        if static_reassign is None:
            perm = tf.cond(reassign, solve, lambda: tf.range(batch, dtype=tf.int32))
        else:
            perm = solve()
        return tf.gather(ids, perm), tf.gather(targets, perm)

    def _reassign_global(self, ids, features, reassign, static_reassign, batch):
        global_features = cross_replica.all_gather(tf.stop_gradient(features))
        global_ids = cross_replica.all_gather(ids)
        global_batch = tf.shape(global_ids)[0]

        def solve():
            global_targets = self.vectors(global_ids)
            return optimal_assignment(_pairwise_sq_dist(global_features, global_targets))

        # One solve per step in the cluster: replica 0 solves, the others build no host work
        # (nor the B x B cost) and receive its permutation, so all apply the same one.
        first = cross_replica.is_first_replica()
        if first is False:
            perm = tf.range(global_batch, dtype=tf.int32)
        elif static_reassign is None or first is not True:
            perm = tf.cond(tf.logical_and(reassign, first), solve,
                           lambda: tf.range(global_batch, dtype=tf.int32))
        else:
            perm = solve()
        perm = cross_replica.from_first_replica(perm)
        offset = cross_replica.replica_offset(batch)
        new_ids = tf.gather(global_ids, perm[offset:offset + batch])
        return new_ids, self.vectors(new_ids)
