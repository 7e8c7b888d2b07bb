"""Spatial Contrasting: the sampler and the distance-ratio loss against exact oracles."""

import keras
import numpy as np
import pytest
import scipy.special
import scipy.stats
import tensorflow as tf

from losses.spatial_contrasting import (
    SpatialContrastingLoss,
    endpoint_seed,
    multi_endpoint_loss,
    patch_hw,
    patch_matching_accuracy,
    patch_offsets,
    sample_patch_pairs,
    spatial_contrasting_loss,
)
from runtime.errors import InvalidInput
from tests.helpers import two_replica_strategy

# ----------------------------------------------------------------------------- oracles


def _dist64(a, c, squared):
    a, c = np.asarray(a, np.float64), np.asarray(c, np.float64)
    sq = ((a[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    return sq if squared else np.sqrt(sq)


def _rows_loss64(dist):
    """-log_softmax(-dist)[i, i] for each row i."""
    return scipy.special.logsumexp(-dist, axis=1) + np.diag(dist)


def _loss64(a, c, squared=False, symmetric=True):
    dist = _dist64(a, c, squared)
    loss = _rows_loss64(dist)
    return 0.5 * (loss + _rows_loss64(dist.T)) if symmetric else loss


def _grad64(a, c, squared=False, symmetric=True):
    """d mean_i(loss_i) / d(a, c) in float64, with the norm's subgradient 0 at distance 0."""
    a, c = np.asarray(a, np.float64), np.asarray(c, np.float64)
    n = len(a)
    dist = _dist64(a, c, squared)
    eye = np.eye(n)
    # d loss_i / d dist[i, k] = [k == i] - softmax(-dist[i])_k
    g = (eye - scipy.special.softmax(-dist, axis=1)) / n
    if symmetric:
        g = 0.5 * (g + ((eye - scipy.special.softmax(-dist.T, axis=1)) / n).T)
    diff = a[:, None, :] - c[None, :, :]
    if squared:
        ddist = 2.0 * diff
    else:
        norm = np.sqrt((diff ** 2).sum(-1, keepdims=True))
        ddist = np.divide(diff, norm, out=np.zeros_like(diff), where=norm > 0)
    weighted = g[:, :, None] * ddist
    return weighted.sum(1), -weighted.sum(0)


def _tf_grad(a, c, **kwargs):
    a, c = tf.constant(a, tf.float32), tf.constant(c, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch([a, c])
        loss = tf.reduce_mean(spatial_contrasting_loss(a, c, **kwargs))
    return [g.numpy() for g in tape.gradient(loss, [a, c])]


def _pair(n=7, d=5, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(scale * rng.normal(size=(n, d))).astype(np.float32) for _ in range(2)]


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_loss_matches_float64_oracle(squared, symmetric):
    a, c = _pair()
    got = spatial_contrasting_loss(a, c, squared=squared, symmetric=symmetric)
    assert got.dtype == tf.float32 and got.shape == (7,)
    np.testing.assert_allclose(got.numpy(), _loss64(a, c, squared, symmetric),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gradient_matches_float64_oracle(squared, symmetric):
    a, c = _pair(n=5, d=4, seed=1)
    ga, gc = _tf_grad(a, c, squared=squared, symmetric=symmetric)
    oa, oc = _grad64(a, c, squared, symmetric)
    np.testing.assert_allclose(ga, oa, atol=1e-5)
    np.testing.assert_allclose(gc, oc, atol=1e-5)


def test_closed_form_for_two_images():
    # a1=(0,0), c1=(0,1), a2=c2=(3,4):
    #   Dist = [[1, 5], [sqrt(18), 0]],  Dist^2 = [[1, 25], [18, 0]].
    # For N = 2, -log_softmax(-d)[i] = log(1 + exp(d_ii - d_ij)) = softplus(d_ii - d_ij).
    a = np.array([[0.0, 0.0], [3.0, 4.0]], np.float32)
    c = np.array([[0.0, 1.0], [3.0, 4.0]], np.float32)
    r18 = np.sqrt(18.0)
    rows = [np.log1p(np.exp(1.0 - 5.0)), np.log1p(np.exp(0.0 - r18))]
    cols = [np.log1p(np.exp(1.0 - r18)), np.log1p(np.exp(0.0 - 5.0))]
    np.testing.assert_allclose(spatial_contrasting_loss(a, c, symmetric=False), rows, rtol=1e-5)
    np.testing.assert_allclose(spatial_contrasting_loss(a, c),
                               0.5 * (np.array(rows) + cols), rtol=1e-5)
    rows_sq = [np.log1p(np.exp(1.0 - 25.0)), np.log1p(np.exp(0.0 - 18.0))]
    cols_sq = [np.log1p(np.exp(1.0 - 18.0)), np.log1p(np.exp(0.0 - 25.0))]
    np.testing.assert_allclose(spatial_contrasting_loss(a, c, squared=True, symmetric=False),
                               rows_sq, rtol=1e-5)
    np.testing.assert_allclose(spatial_contrasting_loss(a, c, squared=True),
                               0.5 * (np.array(rows_sq) + cols_sq), rtol=1e-5)


def test_permuting_the_batch_permutes_the_losses():
    a, c = _pair(n=9, seed=2)
    perm = np.random.default_rng(3).permutation(9)
    for symmetric in (False, True):
        loss = spatial_contrasting_loss(a, c, symmetric=symmetric).numpy()
        permuted = spatial_contrasting_loss(a[perm], c[perm], symmetric=symmetric).numpy()
        np.testing.assert_allclose(permuted, loss[perm], rtol=1e-6, atol=1e-6)


def test_symmetric_flag_averages_the_transposed_term():
    a, c = _pair(seed=4)
    one_way = spatial_contrasting_loss(a, c, symmetric=False).numpy()
    other_way = spatial_contrasting_loss(c, a, symmetric=False).numpy()
    both = spatial_contrasting_loss(a, c, symmetric=True).numpy()
    np.testing.assert_allclose(both, 0.5 * (one_way + other_way), rtol=1e-6)
    np.testing.assert_allclose(both, spatial_contrasting_loss(c, a).numpy(), rtol=1e-6)
    assert np.abs(both - one_way).max() > 1e-3  # the flag does change the loss


@pytest.mark.parametrize("squared", [False, True])
def test_large_distances_stay_finite_and_exact(squared):
    # Distances of ~1e3..1e4 (~1e8 squared): exp(-Dist) underflows to 0 in any precision, so
    # an exp-then-log loss would return inf; the log-sum-exp form keeps full precision.
    a, c = _pair(n=6, d=3, seed=5, scale=3e3)
    c[2] = a[2] + 0.5  # one near positive, the others far from their positive
    dist = _dist64(a, c, squared)
    assert 1e3 < dist.max() <= (1e8 if squared else 1e4)
    want = _loss64(a, c, squared)
    with np.errstate(divide="ignore", invalid="ignore"):
        naive = -np.log(np.exp(-np.diag(dist)) / np.exp(-dist).sum(1))
    assert not np.isfinite(naive).all()
    got = spatial_contrasting_loss(a, c, squared=squared).numpy()
    assert np.isfinite(got).all()
    # float32 resolution of the distances themselves, relative to their size.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * dist.max())
    assert got[2] < want.max()


@pytest.mark.parametrize("squared", [False, True])
def test_gradient_is_finite_and_exact_at_zero_distance(squared):
    # Coinciding windows: every anchor equals its contrast (the diagonal distances are 0).
    a, _ = _pair(n=5, d=4, seed=6)
    ga, gc = _tf_grad(a, a.copy(), squared=squared)
    assert np.isfinite(ga).all() and np.isfinite(gc).all()
    oa, oc = _grad64(a, a, squared)
    np.testing.assert_allclose(ga, oa, atol=1e-5)
    np.testing.assert_allclose(gc, oc, atol=1e-5)
    # Every distance 0 (a collapsed representation): the loss is log N, the gradient 0.
    same = np.ones((4, 3), np.float32) * 7.0
    ga, gc = _tf_grad(same, same, squared=squared)
    np.testing.assert_allclose(ga, 0.0)
    np.testing.assert_allclose(gc, 0.0)
    np.testing.assert_allclose(spatial_contrasting_loss(same, same), np.log(4.0), rtol=1e-6)


def test_half_precision_inputs_give_float32_loss():
    a, c = _pair(seed=7)
    got = spatial_contrasting_loss(tf.constant(a, tf.float16), tf.constant(c, tf.float16))
    assert got.dtype == tf.float32
    want = _loss64(a.astype(np.float16), c.astype(np.float16))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)


def test_loss_validation_errors():
    a, c = _pair()
    with pytest.raises(ValueError, match="anchors must be"):
        spatial_contrasting_loss(a[0], c)
    with pytest.raises(ValueError, match="same shape"):
        spatial_contrasting_loss(a, c[:, :3])
    with pytest.raises(ValueError, match="same shape"):
        spatial_contrasting_loss(a, c[:4])
    with pytest.raises(ValueError, match="floating point"):
        spatial_contrasting_loss(a.astype(np.int32), c.astype(np.int32))


def test_patch_matching_accuracy_matches_argmin_oracle():
    a, c = _pair(n=8, d=3, seed=8)
    c = a + 0.8 * c  # most anchors are nearest to their own contrast, not all
    got = patch_matching_accuracy(a, c).numpy()
    want = (_dist64(a, c, False).argmin(1) == np.arange(8)).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    assert 0 < want.mean() < 1
    # Hand case: the contrasts of images 0 and 1 are swapped.
    a = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
    np.testing.assert_array_equal(patch_matching_accuracy(a, a[[1, 0, 2]]), [0.0, 0.0, 1.0])


def test_keras_wrapper_and_config():
    a, c = _pair(seed=9)
    loss = SpatialContrastingLoss(squared=True, symmetric=False, reduction=None)
    np.testing.assert_allclose(loss(c, a), _loss64(a, c, True, False), rtol=1e-5)
    mean = SpatialContrastingLoss()
    np.testing.assert_allclose(float(mean(c, a)), _loss64(a, c).mean(), rtol=1e-5)
    config = loss.get_config()
    assert config["squared"] is True and config["symmetric"] is False
    clone = SpatialContrastingLoss.from_config(config)
    assert (clone.squared, clone.symmetric, clone.name) == (True, False, loss.name)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, SpatialContrastingLoss) and restored.squared


def test_multi_endpoint_loss_is_the_weighted_sum():
    rng = np.random.default_rng(10)
    maps = {"block1": rng.normal(size=(4, 8, 8, 3)).astype(np.float32),
            "sc": rng.normal(size=(4, 4, 4, 5)).astype(np.float32),
            "logits": rng.normal(size=(4, 10)).astype(np.float32)}
    seed = (3, 4)
    out = multi_endpoint_loss(maps, {"block1": 0.5, "sc": 2.0},
                              {"block1": (3, 3), "sc": 0.5}, seed)
    want = 0.0
    # an area of 0.5 of the 4x4 map -> 3x3 cells (sqrt(0.5) * 4 = 2.83)
    for name, weight, size in (("block1", 0.5, (3, 3)), ("sc", 2.0, (3, 3))):
        p1, p2 = sample_patch_pairs(maps[name], size, endpoint_seed(seed, name))
        part = spatial_contrasting_loss(p1, p2).numpy()
        np.testing.assert_allclose(out.losses[name], part, rtol=1e-6)
        np.testing.assert_array_equal(out.accuracy[name], patch_matching_accuracy(p1, p2))
        want = want + weight * part
    np.testing.assert_allclose(out.total, want, rtol=1e-6)
    # The endpoints draw different windows.
    assert not np.array_equal(endpoint_seed(seed, "sc"), endpoint_seed(seed, "block1"))
    with pytest.raises(InvalidInput, match="'conv9' not found"):
        multi_endpoint_loss(maps, {"conv9": 1.0}, 0.3, seed)
    with pytest.raises(ValueError, match="weight of endpoint 'sc'"):
        multi_endpoint_loss(maps, {"sc": -1.0}, 0.3, seed)
    with pytest.raises(ValueError, match="at least one"):
        multi_endpoint_loss(maps, {}, 0.3, seed)
    with pytest.raises(InvalidInput, match="no patch_size for endpoint 'sc'"):
        multi_endpoint_loss(maps, {"sc": 1.0}, {"block1": 0.3}, seed)


# ----------------------------------------------------------------------------- the sampler


def _coordinate_map(n, h, w):
    """[n, h, w, 2] whose cell (r, c) holds (r, c): a window's first cell is its offset."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.broadcast_to(np.stack([rows, cols], -1), (n, h, w, 2)).astype(np.float32)


def _offsets_from_windows(p1, p2, h, w):
    """int [n, 2 windows, 2 (row, col)] read back from windows of a coordinate map."""
    first = [np.asarray(p).reshape(-1, h, w, 2)[:, 0, 0, :] for p in (p1, p2)]
    return np.stack(first, axis=1).astype(np.int64)


def _assert_independent(x, y, levels_x, levels_y):
    """Chi-square test of independence of two discrete samples (contingency table)."""
    table = np.zeros((levels_x, levels_y))
    np.add.at(table, (x, y), 1)
    assert (table.sum(0) > 0).all() and (table.sum(1) > 0).all()
    p = scipy.stats.chi2_contingency(table).pvalue
    assert p > 1e-3, f"offsets are dependent (chi-square p = {p:.3g})"


def _reused_offset_sampler(fm, h, w, seed):
    """A wrong sampler, which the tests tell apart from `sample_patch_pairs`: one random offset
    used for both the row and the column."""
    n, big_h = fm.shape[0], fm.shape[1]
    off = np.random.default_rng(seed).integers(0, big_h - h + 1, size=(n, 2))
    return [np.stack([fm[i, o[k]:o[k] + h, o[k]:o[k] + w].reshape(-1)
                      for i, o in enumerate(off)]) for k in (0, 1)]


def test_patch_hw_rules():
    assert patch_hw((3, 2), (8, 6)) == (3, 2)
    # area fraction a -> each side * sqrt(a), rounded half up, clipped to [1, side]
    assert patch_hw(0.3, (8, 8)) == (4, 4)  # sqrt(.3)*8 = 4.38
    assert patch_hw(0.3, (24, 24)) == (13, 13)  # 13.15
    assert patch_hw(0.9, (7, 7)) == (7, 7)  # 6.64
    assert patch_hw(0.25, (5, 3)) == (3, 2)  # 2.5 -> 3, 1.5 -> 2
    assert patch_hw(1e-6, (8, 8)) == (1, 1)
    assert patch_hw(1.0, (8, 6)) == (8, 6)
    for bad, message in [(0.0, "area fraction"), (1.5, "area fraction"), (3, "bare int"),
                         ((9, 2), "does not fit"), ((0, 2), "does not fit"),
                         ((2.5, 2), "must hold ints"), ((1, 2, 3), "pair")]:
        with pytest.raises(ValueError, match=message):
            patch_hw(bad, (8, 6))


def test_windows_are_the_slices_at_their_offsets():
    fm = np.random.default_rng(11).normal(size=(5, 7, 9, 3)).astype(np.float32)
    seed = (5, 6)
    offsets = patch_offsets(5, (7, 9), (3, 4), seed).numpy()
    assert offsets.shape == (5, 2, 2) and offsets.dtype == np.int32
    flat = sample_patch_pairs(fm, (3, 4), seed, pool="flatten")
    avg = sample_patch_pairs(fm, (3, 4), seed, pool="avg")
    for k in (0, 1):
        assert flat[k].shape == (5, 3 * 4 * 3) and avg[k].shape == (5, 3)
        for n in range(5):
            r, c = offsets[n, k]
            window = fm[n, r:r + 3, c:c + 4, :]
            np.testing.assert_array_equal(flat[k][n], window.reshape(-1))
            np.testing.assert_allclose(avg[k][n], window.mean((0, 1)), rtol=1e-6, atol=1e-6)
    # Not all windows coincide (two draws per image).
    assert (offsets[:, 0] != offsets[:, 1]).any()


def test_offsets_cover_the_valid_range_uniformly():
    n, big_h, big_w, h, w = 3000, 8, 6, 3, 2
    p1, p2 = sample_patch_pairs(_coordinate_map(n, big_h, big_w), (h, w), (7, 8),
                                pool="flatten")
    off = _offsets_from_windows(p1, p2, h, w)
    for axis, span in ((0, big_h - h + 1), (1, big_w - w + 1)):
        values = off[:, :, axis].reshape(-1)
        assert values.min() == 0 and values.max() == span - 1
        counts = np.bincount(values, minlength=span)
        p = scipy.stats.chisquare(counts).pvalue
        assert p > 1e-3, f"offsets along axis {axis} are not uniform (p = {p:.3g})"


def test_row_and_column_offsets_are_independent():
    n, side, h = 3000, 8, 3
    levels = side - h + 1
    p1, p2 = sample_patch_pairs(_coordinate_map(n, side, side), (h, h), (9, 10),
                                pool="flatten")
    off = _offsets_from_windows(p1, p2, h, h)
    for k in (0, 1):
        _assert_independent(off[:, k, 0], off[:, k, 1], levels, levels)
    _assert_independent(off[:, 0, 0], off[:, 1, 0], levels, levels)  # the two windows' rows
    _assert_independent(off[:, 0, 1], off[:, 1, 1], levels, levels)  # and columns
    # The same check rejects a sampler that reuses one offset for rows and columns.
    bad = _offsets_from_windows(*_reused_offset_sampler(_coordinate_map(n, side, side), h, h, 0),
                                h, h)
    with pytest.raises(AssertionError, match="dependent"):
        _assert_independent(bad[:, 0, 0], bad[:, 0, 1], levels, levels)


def test_sampler_is_deterministic_and_accepts_unknown_batch():
    fm = np.random.default_rng(12).normal(size=(6, 8, 8, 4)).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 4]), tf.TensorSpec([2], tf.int64)])
    def sample(x, seed):
        return sample_patch_pairs(x, 0.3, seed, pool="flatten")

    first = sample(fm, tf.constant([1, 2], tf.int64))
    again = sample(fm, tf.constant([1, 2], tf.int64))
    eager = sample_patch_pairs(fm, (4, 4), (1, 2), pool="flatten")
    other = sample(fm, tf.constant([1, 3], tf.int64))
    for k in (0, 1):
        assert first[k].shape == (6, 4 * 4 * 4)
        np.testing.assert_array_equal(first[k], again[k])
        np.testing.assert_array_equal(first[k], eager[k])
    assert not np.array_equal(first[0], other[0])
    int32_seed = sample_patch_pairs(fm, (4, 4), tf.constant([1, 2], tf.int32), pool="flatten")
    np.testing.assert_array_equal(int32_seed[1], eager[1])
    assert sample_patch_pairs(fm, (4, 4), (1, 2))[0].shape == (6, 4)  # averaged by default


def test_sampler_validation_errors():
    fm = np.zeros((2, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="pool must be one of"):
        sample_patch_pairs(fm, 0.3, (1, 2), pool="max")
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        sample_patch_pairs(fm[0], 0.3, (1, 2))
    with pytest.raises(InvalidInput, match="does not fit"):
        sample_patch_pairs(fm, (9, 1), (1, 2))
    with pytest.raises(ValueError, match="static H, W, C"):
        tf.function(lambda x: sample_patch_pairs(x, 0.3, (1, 2))).get_concrete_function(
            tf.TensorSpec([None, None, None, 3]))
    with pytest.raises(ValueError, match="shape \\[2\\]"):
        sample_patch_pairs(fm, 0.3, (1, 2, 3))
    with pytest.raises(ValueError, match="seed must be a pair"):
        sample_patch_pairs(fm, 0.3, 5)
    with pytest.raises(ValueError, match="integers"):
        sample_patch_pairs(fm, 0.3, (1.0, 2.0))


# ----------------------------------------------------------------------------- tf.distribute


@pytest.fixture(scope="module")
def two_replicas():
    """One 2-CPU MirroredStrategy for the module (tests/helpers.py)."""
    return two_replica_strategy()


@pytest.mark.parametrize("symmetric,squared,split", [(True, False, (3, 3)),
                                                     (False, True, (4, 2))])
def test_two_replicas_match_one_device(two_replicas, symmetric, squared, split):
    """Sampling + loss on 2 replicas == one device on the global batch: the per-example loss,
    the global-batch average, and the gradients (summed over replicas) w.r.t. a mirrored
    variable and w.r.t. each replica's inputs."""
    global_batch = sum(split)
    rng = np.random.default_rng(13)
    images = rng.normal(size=(global_batch, 5, 6, 3)).astype(np.float32)
    kernel0 = rng.normal(size=(3, 4)).astype(np.float32)
    seed = tf.constant([21, 22], tf.int64)
    starts = (0, split[0])

    def step(x, kernel):
        """Per-example loss, global-average loss, d/dkernel, d/dx, matching accuracy."""
        with tf.GradientTape() as tape:
            tape.watch(x)
            features = tf.einsum("nhwc,cd->nhwd", x, kernel)
            p1, p2 = sample_patch_pairs(features, (2, 3), seed)
            per_example = spatial_contrasting_loss(p1, p2, squared=squared,
                                                   symmetric=symmetric)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
        d_kernel, d_x = tape.gradient(loss, [kernel, x])
        return per_example, loss, d_kernel, d_x, patch_matching_accuracy(p1, p2)

    single = step(tf.constant(images), tf.Variable(kernel0))

    strategy = two_replicas
    with strategy.scope():
        kernel = tf.Variable(kernel0)
    local = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(images[starts[ctx.replica_id_in_sync_group]:][
            :split[ctx.replica_id_in_sync_group]]))

    @tf.function
    def distributed(x):
        def replica_step(x):
            per_example, loss, d_kernel, d_x, acc = step(x, kernel)
            ctx = tf.distribute.get_replica_context()
            # What the optimizer applies: the replicas' gradients summed.
            d_kernel = ctx.all_reduce(tf.distribute.ReduceOp.SUM, d_kernel)
            loss = ctx.all_reduce(tf.distribute.ReduceOp.SUM, loss)
            return per_example, loss, d_kernel, d_x, acc
        return strategy.run(replica_step, args=(x,))

    results = distributed(local)
    per_example, loss, d_kernel, d_x, acc = (strategy.experimental_local_results(r)
                                             for r in results)
    assert [len(p) for p in per_example] == list(split)
    np.testing.assert_allclose(np.concatenate(per_example), single[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(acc), single[4])
    for replica in range(2):
        np.testing.assert_allclose(loss[replica], single[1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(d_kernel[replica], single[2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(d_x), single[3], rtol=1e-5, atol=1e-5)
    assert np.abs(single[2].numpy()).max() > 1e-3  # a real gradient, not all zeros
