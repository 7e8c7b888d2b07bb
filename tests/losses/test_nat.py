"""Tests of losses/nat.py: sphere targets, the Hungarian step, the square loss, the NAT state."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.optimize
import tensorflow as tf

from losses.nat import (
    NoiseAsTargets,
    nat_loss,
    onehot_targets,
    optimal_assignment,
    sphere_targets,
)
from tests.helpers import is_permutation, two_replica_strategy

# ----------------------------------------------------------------------------- helpers


def _unit_rows(rng: np.random.Generator, b: int, d: int) -> np.ndarray:
    z = rng.normal(size=(b, d)).astype(np.float32)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def _np_sq_dist(z: np.ndarray, c: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    c = c.astype(np.float64)
    return ((z[:, None, :] - c[None, :, :]) ** 2).sum(-1)


def _optimum(cost: np.ndarray) -> float:
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    return float(cost[rows, cols].sum())


def _brute_force(cost: np.ndarray) -> float:
    b = cost.shape[0]
    perms = np.array(list(itertools.permutations(range(b))), dtype=np.int64).reshape(-1, b)
    return float(cost[np.arange(b)[None, :], perms].sum(axis=1).min())


def _per_replica(strategy, parts):
    """A distributed value whose replica r holds parts[r]."""
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group])
    )


def _distributed_step(strategy, nat):
    @tf.function
    def step(indices, features, reassign):
        loss, stats = strategy.run(nat, args=(indices, features, reassign))
        return (strategy.experimental_local_results(loss),
                strategy.experimental_local_results(stats["reassigned_fraction"]))

    return step


def _replica_copies(var) -> list[np.ndarray]:
    return [v.numpy() for v in var.values]


# ----------------------------------------------------------------------------- sphere_targets


@pytest.mark.parametrize("dim", [1, 2, 7, 128, 2048])
def test_sphere_targets_unit_norm(dim):
    c = sphere_targets(tf.range(500), dim, seed=3)
    assert c.dtype == tf.float32 and c.shape == (500, dim)
    norms = np.linalg.norm(c.numpy().astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)


@pytest.mark.parametrize("dim", [5, 100, 2048])
def test_sphere_targets_row_is_a_function_of_seed_and_id(dim):
    ref = sphere_targets(tf.range(400), dim, seed=11).numpy()
    rng = np.random.default_rng(0)
    graph = tf.function(lambda ids: sphere_targets(ids, dim, seed=11),
                        input_signature=[tf.TensorSpec([None], tf.int64)])
    for b in (1, 2, 3, 16, 33, 257):
        ids = rng.choice(400, size=b, replace=False)
        # Bit-identical whatever the batch, the position, the id dtype, eager or graph.
        np.testing.assert_array_equal(sphere_targets(tf.constant(ids), dim, 11).numpy(), ref[ids])
        np.testing.assert_array_equal(graph(tf.constant(ids, tf.int64)).numpy(), ref[ids])
    with tf.device("/cpu:1"):
        np.testing.assert_array_equal(sphere_targets(tf.constant([399, 7]), dim, 11).numpy(),
                                      ref[[399, 7]])


def test_sphere_targets_seeds_and_ids_differ():
    d = 256
    a = sphere_targets(tf.range(1000), d, seed=0).numpy().astype(np.float64)
    b = sphere_targets(tf.range(1000), d, seed=1).numpy().astype(np.float64)
    assert not np.any(np.all(a == b, axis=1))
    # The same id under two seeds, and two ids under one seed, are independent directions:
    # their dot products have mean 0 and standard deviation 1/sqrt(d); 6 sigma bounds.
    cross_seed = (a * b).sum(1)
    cross_id = (a[:-1] * a[1:]).sum(1)
    for dots in (cross_seed, cross_id):
        assert np.abs(dots).max() < 6.0 / np.sqrt(d)
        assert abs(dots.mean()) < 6.0 / np.sqrt(d * len(dots))
    gram = a @ a.T
    np.fill_diagonal(gram, 0.0)
    assert np.abs(gram).max() < 6.0 / np.sqrt(d)  # no two ids share a target


@pytest.mark.parametrize("dim", [3, 16])
def test_sphere_targets_mean_and_covariance(dim):
    n = 20_000
    c = sphere_targets(tf.range(n), dim, seed=5).numpy().astype(np.float64)
    # Uniform on the sphere: E[c] = 0, E[c c^T] = I/d. Standard errors of the sample moments:
    #   mean_j:          sqrt(1 / (d n))
    #   cov_jk, j != k:  sqrt(1 / (d (d + 2) n))           (E[c_j^2 c_k^2] = 1/(d(d+2)))
    #   cov_jj:          sqrt((3 / (d (d + 2)) - 1/d^2) / n) (E[c_j^4] = 3/(d(d+2)))
    # Tolerance: 5 standard errors per entry.
    mean = c.mean(0)
    assert np.abs(mean).max() < 5.0 * np.sqrt(1.0 / (dim * n))
    cov = c.T @ c / n
    off = ~np.eye(dim, dtype=bool)
    assert np.abs(cov[off]).max() < 5.0 * np.sqrt(1.0 / (dim * (dim + 2) * n))
    diag_se = np.sqrt((3.0 / (dim * (dim + 2)) - 1.0 / dim**2) / n)
    assert np.abs(np.diag(cov) - 1.0 / dim).max() < 5.0 * diag_se


def test_sphere_targets_first_coordinate_law():
    # For d = 3 the first coordinate of a uniform unit vector is uniform on [-1, 1]
    # (Archimedes); a Kolmogorov-Smirnov distance of 1.63 / sqrt(n) is the 1% critical value.
    n = 20_000
    x = np.sort(sphere_targets(tf.range(n), 3, seed=9).numpy()[:, 0].astype(np.float64))
    cdf = (x + 1.0) / 2.0
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert ks < 1.63 / np.sqrt(n)


def test_sphere_targets_validation():
    with pytest.raises(ValueError, match="dim must be a positive int"):
        sphere_targets(tf.range(3), 0, seed=1)
    with pytest.raises(ValueError, match="seed must be in"):
        sphere_targets(tf.range(3), 4, seed=-1)
    with pytest.raises(ValueError, match="target_ids must be integers"):
        sphere_targets(tf.constant([1.0, 2.0]), 4, seed=1)
    with pytest.raises(ValueError, match="rank 1"):
        sphere_targets(tf.zeros([2, 2], tf.int32), 4, seed=1)


# ----------------------------------------------------------------------------- optimal_assignment


@pytest.mark.parametrize("b", [1, 2, 3, 4, 5, 6, 7])
def test_optimal_assignment_matches_brute_force(b):
    rng = np.random.default_rng(b)
    costs = [
        rng.normal(size=(b, b)),
        rng.integers(0, 3, size=(b, b)).astype(np.float64),  # many ties
        np.ones((b, b)),  # every permutation ties
        -np.eye(b)[::-1],  # the optimum is the anti-diagonal
    ]
    for cost in costs:
        perm = optimal_assignment(tf.constant(cost, tf.float32)).numpy()
        assert perm.dtype == np.int32 and is_permutation(perm)
        np.testing.assert_allclose(cost[np.arange(b), perm].sum(), _brute_force(cost), atol=1e-6)


def test_optimal_assignment_hand_example():
    cost = tf.constant([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    # Brute force by hand: (0->1, 1->0, 2->2) costs 1 + 2 + 2 = 5, the unique minimum.
    np.testing.assert_array_equal(optimal_assignment(cost).numpy(), [1, 0, 2])


def test_optimal_assignment_matches_scipy_at_256():
    rng = np.random.default_rng(0)
    z, c = _unit_rows(rng, 256, 32), _unit_rows(rng, 256, 32)
    cost = _np_sq_dist(z, c).astype(np.float32)
    graph = tf.function(optimal_assignment,
                        input_signature=[tf.TensorSpec([256, 256], tf.float32)])
    for perm in (optimal_assignment(tf.constant(cost)), graph(tf.constant(cost))):
        assert perm.shape == (256,)
        perm = perm.numpy()
        assert is_permutation(perm)
        np.testing.assert_allclose(cost.astype(np.float64)[np.arange(256), perm].sum(),
                                   _optimum(cost.astype(np.float64)), rtol=1e-6)


def test_optimal_assignment_static_shape_and_no_gradient():
    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32)])
    def dynamic(cost):
        perm = optimal_assignment(cost)
        assert perm.shape.as_list() == [None]
        return perm

    @tf.function(input_signature=[tf.TensorSpec([5, 5], tf.float32)])
    def static(cost):
        perm = optimal_assignment(cost)
        assert perm.shape.as_list() == [5]
        return perm

    cost = tf.constant(np.random.default_rng(1).normal(size=(5, 5)), tf.float32)
    np.testing.assert_array_equal(dynamic(cost).numpy(), static(cost).numpy())
    with tf.GradientTape() as tape:
        tape.watch(cost)
        perm = optimal_assignment(cost)
        through_perm = tf.reduce_sum(tf.cast(perm, tf.float32))
    assert tape.gradient(through_perm, cost) is None


def test_optimal_assignment_inside_strategy_run():
    strategy = two_replica_strategy()
    rng = np.random.default_rng(2)
    costs = [rng.normal(size=(6, 6)).astype(np.float32) for _ in range(2)]

    @tf.function
    def solve(cost):
        return strategy.experimental_local_results(strategy.run(optimal_assignment, (cost,)))

    for r, perm in enumerate(solve(_per_replica(strategy, costs))):
        np.testing.assert_allclose(costs[r].astype(np.float64)[np.arange(6), perm.numpy()].sum(),
                                   _brute_force(costs[r].astype(np.float64)), rtol=1e-6)


def test_optimal_assignment_validation():
    with pytest.raises(ValueError, match="square"):
        optimal_assignment(tf.zeros([3, 4]))
    with pytest.raises(ValueError, match="square"):
        optimal_assignment(tf.zeros([3]))


# ----------------------------------------------------------------------------- nat_loss


def test_nat_loss_matches_numpy_and_hand_values():
    z = tf.constant([[1.0, 0.0], [0.6, 0.8]])
    c = tf.constant([[0.0, 1.0], [0.6, 0.8]])
    # ||(1, -1)||^2 = 2 and 0.
    np.testing.assert_allclose(nat_loss(z, c).numpy(), [2.0, 0.0], atol=1e-7)
    rng = np.random.default_rng(3)
    z, c = _unit_rows(rng, 9, 6), _unit_rows(rng, 9, 6)
    np.testing.assert_allclose(nat_loss(z, c).numpy(), ((z - c) ** 2).sum(1), rtol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        nat_loss(tf.zeros([3, 2]), tf.zeros([3, 4]))


# ----------------------------------------------------------------------------- NoiseAsTargets


def test_state_is_one_seeded_int32_permutation():
    nat = NoiseAsTargets(1000, dim=2048, seed=4)
    assert [v.name for v in nat.variables] == ["assignment:0"]
    assert nat.assignment.dtype == tf.int32 and nat.assignment.shape == (1000,)
    assert not nat.assignment.trainable
    first = nat.assignment.numpy()
    assert is_permutation(first)
    np.testing.assert_array_equal(NoiseAsTargets(1000, 2048, seed=4).assignment.numpy(), first)
    assert not np.array_equal(NoiseAsTargets(1000, 2048, seed=5).assignment.numpy(), first)


def test_step_matches_numpy_oracle():
    n, d, b = 40, 8, 10
    nat = NoiseAsTargets(n, d, seed=1)
    rng = np.random.default_rng(4)
    idx = rng.choice(n, size=b, replace=False)
    z = _unit_rows(rng, b, d)
    before = nat.assignment.numpy()
    targets = sphere_targets(tf.constant(before[idx]), d, 1).numpy()
    cost = _np_sq_dist(z, targets)

    features = tf.constant(z)
    with tf.GradientTape() as tape:
        tape.watch(features)
        loss, stats = nat(tf.constant(idx), features, tf.constant(True))
        mean_loss = tf.reduce_mean(loss)
    after = nat.assignment.numpy()

    # Images traded the targets they held, and nothing outside the batch moved.
    others = np.setdiff1d(np.arange(n), idx)
    np.testing.assert_array_equal(after[others], before[others])
    np.testing.assert_array_equal(np.sort(after[idx]), np.sort(before[idx]))
    # The new pairing reaches the optimum of the b x b problem (scipy oracle)...
    np.testing.assert_allclose(loss.numpy().sum(), _optimum(cost), rtol=1e-5)
    # ...and the loss is ||z_i - C[assignment[i]]||^2 for the written assignment.
    new_targets = sphere_targets(tf.constant(after[idx]), d, 1).numpy()
    np.testing.assert_allclose(loss.numpy(), ((z - new_targets) ** 2).sum(1), rtol=1e-5,
                               atol=1e-6)
    # Gradient of the mean square loss: 2 (z - c) / b, flowing to the features only.
    np.testing.assert_allclose(tape.gradient(mean_loss, features).numpy(),
                               2.0 * (z - new_targets) / b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["loss_before"].numpy(), np.trace(cost) / b, rtol=1e-5)
    np.testing.assert_allclose(stats["loss_after"].numpy(), loss.numpy().mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["reassigned_fraction"].numpy(),
                               np.mean(after[idx] != before[idx]))


def test_onehot_targets_are_balanced_basis_vectors_and_the_step_uses_them():
    np.testing.assert_array_equal(onehot_targets(tf.constant([0, 3, 4, 9]), 4).numpy(),
                                  np.eye(4)[[0, 3, 0, 1]])
    n, d, b = 40, 4, 10  # 40 targets: 10 copies of each of the 4 basis vectors
    counts = np.bincount(np.argmax(onehot_targets(tf.range(n), d).numpy(), axis=1))
    np.testing.assert_array_equal(counts, [10, 10, 10, 10])
    nat = NoiseAsTargets(n, d, seed=2, targets="onehot")
    rng = np.random.default_rng(5)
    idx = rng.choice(n, size=b, replace=False)
    z = _unit_rows(rng, b, d)
    before = nat.assignment.numpy()
    cost = _np_sq_dist(z, np.eye(d)[before[idx] % d])
    loss, _ = nat(tf.constant(idx), tf.constant(z), True)
    after = nat.assignment.numpy()
    np.testing.assert_allclose(loss.numpy().sum(), _optimum(cost), rtol=1e-5)
    np.testing.assert_allclose(loss.numpy(), ((z - np.eye(d)[after[idx] % d]) ** 2).sum(1),
                               rtol=1e-5, atol=1e-6)
    assert is_permutation(after)
    with pytest.raises(ValueError, match="targets must be one of sphere, onehot"):
        NoiseAsTargets(n, d, seed=2, targets="binary")


def test_reassignment_never_increases_the_loss():
    n, d, b = 64, 16, 16
    nat = NoiseAsTargets(n, d, seed=2)
    step = tf.function(nat)
    rng = np.random.default_rng(5)
    for _ in range(8):
        idx = tf.constant(rng.choice(n, size=b, replace=False))
        z = tf.constant(_unit_rows(rng, b, d))
        held, _ = step(idx, z, tf.constant(False))
        loss, stats = step(idx, z, tf.constant(True))
        assert loss.numpy().sum() <= held.numpy().sum() + 1e-5
        np.testing.assert_allclose(stats["loss_before"].numpy(), held.numpy().mean(), rtol=1e-6)
        # Re-solving on the same features keeps the (already optimal) pairing's loss.
        again, _ = step(idx, z, tf.constant(True))
        np.testing.assert_allclose(again.numpy().sum(), loss.numpy().sum(), rtol=1e-5)


@pytest.mark.parametrize("reassign", [False, "tensor"])
def test_no_reassignment_changes_nothing(reassign):
    n, d, b = 30, 4, 6
    nat = NoiseAsTargets(n, d, seed=3)
    flag = tf.constant(False) if reassign == "tensor" else False
    rng = np.random.default_rng(6)
    before = nat.assignment.numpy()
    for step in (nat, tf.function(nat)):
        idx = rng.choice(n, size=b, replace=False)
        z = _unit_rows(rng, b, d)
        loss, stats = step(tf.constant(idx), tf.constant(z), flag)
        np.testing.assert_array_equal(nat.assignment.numpy(), before)
        held = sphere_targets(tf.constant(before[idx]), d, 3).numpy()
        np.testing.assert_allclose(loss.numpy(), ((z - held) ** 2).sum(1), rtol=1e-5, atol=1e-6)
        assert stats["reassigned_fraction"].numpy() == 0.0


def test_many_random_steps_keep_the_bijection():
    n, d, b = 50, 6, 8
    nat = NoiseAsTargets(n, d, seed=7)
    step = tf.function(nat)
    rng = np.random.default_rng(7)
    start = nat.assignment.numpy()
    for _ in range(40):
        idx = rng.choice(n, size=b, replace=False)
        step(tf.constant(idx, tf.int64), tf.constant(_unit_rows(rng, b, d)),
             tf.constant(bool(rng.integers(0, 2))))
        assert is_permutation(nat.assignment.numpy())
    assert np.mean(nat.assignment.numpy() != start) > 0.5  # it did move


def test_repeated_or_out_of_range_indices_raise():
    nat = NoiseAsTargets(20, 4, seed=0)
    z = tf.constant(_unit_rows(np.random.default_rng(8), 4, 4))
    before = nat.assignment.numpy()
    for step in (nat, tf.function(nat)):
        for flag in (tf.constant(True), tf.constant(False)):
            with pytest.raises(tf.errors.InvalidArgumentError, match="repeated index"):
                step(tf.constant([3, 5, 3, 1]), z, flag)
        with pytest.raises(tf.errors.InvalidArgumentError, match="outside"):
            step(tf.constant([3, 5, 20, 1]), z, tf.constant(True))
        with pytest.raises(tf.errors.InvalidArgumentError, match="outside"):
            step(tf.constant([3, 5, -1, 1]), z, tf.constant(True))
    np.testing.assert_array_equal(nat.assignment.numpy(), before)


def test_module_validation():
    with pytest.raises(ValueError, match="scope must be one of"):
        NoiseAsTargets(10, 4, seed=0, scope="local")
    with pytest.raises(ValueError, match="num_examples must be a positive int"):
        NoiseAsTargets(0, 4, seed=0)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        NoiseAsTargets(10, 0, seed=0)
    with pytest.raises(ValueError, match="seed must be"):
        NoiseAsTargets(10, 4, seed=2**63)
    nat = NoiseAsTargets(10, 4, seed=0)
    with pytest.raises(ValueError, match="dimension 3, NoiseAsTargets has dim 4"):
        nat(tf.constant([0, 1]), tf.zeros([2, 3]), True)
    with pytest.raises(ValueError, match="disagree on the batch"):
        nat(tf.constant([0, 1, 2]), tf.zeros([2, 4]), True)
    with pytest.raises(ValueError, match=r"indices must be \[b\]"):
        nat(tf.constant([[0, 1]]), tf.zeros([2, 4]), True)


def test_checkpoint_round_trip(tmp_path):
    n, d = 100, 8
    nat = NoiseAsTargets(n, d, seed=9)
    rng = np.random.default_rng(9)
    for _ in range(5):
        nat(tf.constant(rng.choice(n, 10, replace=False)), tf.constant(_unit_rows(rng, 10, d)),
            True)
    saved = nat.assignment.numpy()
    path = tf.train.Checkpoint(nat=nat).save(str(tmp_path / "ckpt"))
    nat(tf.constant(rng.choice(n, 10, replace=False)), tf.constant(_unit_rows(rng, 10, d)), True)
    assert not np.array_equal(nat.assignment.numpy(), saved)

    tf.train.Checkpoint(nat=nat).restore(path).assert_consumed()
    np.testing.assert_array_equal(nat.assignment.numpy(), saved)
    fresh = NoiseAsTargets(n, d, seed=9)  # a resumed run starts from its seed, then restores
    tf.train.Checkpoint(nat=fresh).restore(path).assert_consumed()
    np.testing.assert_array_equal(fresh.assignment.numpy(), saved)


# ----------------------------------------------------------------------------- two replicas


@pytest.mark.parametrize("scope", ["replica", "global"])
def test_two_replicas_stay_identical_and_bijective(scope):
    strategy = two_replica_strategy()
    n, d, b = 48, 6, 6  # b per replica
    with strategy.scope():
        nat = NoiseAsTargets(n, d, seed=11, scope=scope)
    step = _distributed_step(strategy, nat)
    rng = np.random.default_rng(11)
    start = nat.assignment.numpy()
    for i in range(12):
        idx = rng.choice(n, size=2 * b, replace=False).astype(np.int32)
        z = _unit_rows(rng, 2 * b, d)
        step(_per_replica(strategy, [idx[:b], idx[b:]]), _per_replica(strategy, [z[:b], z[b:]]),
             tf.constant(i % 3 != 2))
        copies = _replica_copies(nat.assignment)
        np.testing.assert_array_equal(copies[0], copies[1])
        assert is_permutation(copies[0])
    assert np.mean(nat.assignment.numpy() != start) > 0.3


def test_two_replicas_match_single_device_and_global_beats_replica():
    strategy = two_replica_strategy()
    n, d, b = 40, 4, 5
    rng = np.random.default_rng(12)
    idx = rng.choice(n, size=2 * b, replace=False).astype(np.int32)
    z = _unit_rows(rng, 2 * b, d)
    sharded_idx = _per_replica(strategy, [idx[:b], idx[b:]])
    sharded_z = _per_replica(strategy, [z[:b], z[b:]])

    held = NoiseAsTargets(n, d, seed=12).assignment.numpy()[idx]
    targets = sphere_targets(tf.constant(held), d, 12).numpy()
    cost = _np_sq_dist(z, targets)

    objective, assignments = {}, {}
    for scope in ("replica", "global"):
        with strategy.scope():
            nat = NoiseAsTargets(n, d, seed=12, scope=scope)
        losses, _ = _distributed_step(strategy, nat)(sharded_idx, sharded_z, tf.constant(True))
        objective[scope] = float(np.concatenate([x.numpy() for x in losses]).sum())
        assignments[scope] = nat.assignment.numpy()

    # Replica scope: the two b x b optima; global scope: the 2b x 2b optimum.
    np.testing.assert_allclose(objective["replica"],
                               _optimum(cost[:b, :b]) + _optimum(cost[b:, b:]), rtol=1e-5)
    np.testing.assert_allclose(objective["global"], _optimum(cost), rtol=1e-5)
    assert objective["global"] <= objective["replica"] + 1e-5

    # The sharded global step writes what one device writes on the concatenated batch.
    single = NoiseAsTargets(n, d, seed=12, scope="global")
    single(tf.constant(idx), tf.constant(z), True)
    np.testing.assert_array_equal(assignments["global"], single.assignment.numpy())


def test_two_replicas_repeated_index_across_replicas_raises():
    strategy = two_replica_strategy()
    with strategy.scope():
        nat = NoiseAsTargets(20, 4, seed=13)
    z = _unit_rows(np.random.default_rng(13), 6, 4)
    step = _distributed_step(strategy, nat)
    # Each replica's batch is distinct; index 7 is in both.
    with pytest.raises(tf.errors.InvalidArgumentError, match="repeated index"):
        step(_per_replica(strategy, [np.array([1, 7, 2], np.int32), np.array([7, 9, 4], np.int32)]),
             _per_replica(strategy, [z[:3], z[3:]]), tf.constant(True))


# ----------------------------------------------------------------------------- with a model


@pytest.mark.slow
def test_training_a_model_with_nat():
    import keras

    from models import build_model

    keras.utils.set_random_seed(0)
    n, b, d = 32, 16, 8
    model = build_model("nin_mnist", input_shape=(28, 28, 1), head="nat", feature_dim=d)
    optimizer = keras.optimizers.SGD(learning_rate=0.5)
    nat = NoiseAsTargets(n, d, seed=0)
    images = tf.random.stateless_uniform([n, 28, 28, 1], seed=[1, 2])

    @tf.function
    def step(idx, reassign):
        with tf.GradientTape() as tape:
            z = model(tf.gather(images, idx), training=True)["embedding"]
            loss, stats = nat(idx, z, reassign)
            mean = tf.reduce_mean(loss)
        grads = tape.gradient(mean, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return mean, stats

    def epoch_loss():
        z = model(images, training=False)["embedding"]
        return float(tf.reduce_mean(nat_loss(z, nat.targets(tf.range(n)))))

    start = epoch_loss()
    rng = np.random.default_rng(0)
    for epoch in range(6):
        for part in rng.permutation(n).reshape(-1, b):
            step(tf.constant(part, tf.int32), tf.constant(epoch % 2 == 0))
        assert is_permutation(nat.assignment.numpy())
    assert epoch_loss() < start


def test_optimal_assignment_keeps_the_identity_on_a_non_finite_cost():
    # A diverged step must not crash inside scipy: the targets stay, the loss shows the NaN.
    cost = np.array([[0.0, 1.0], [np.nan, 0.0]], np.float32)
    np.testing.assert_array_equal(optimal_assignment(tf.constant(cost)).numpy(), [0, 1])
    cost = np.array([[1.0, 0.0], [0.0, np.inf]], np.float32)
    np.testing.assert_array_equal(optimal_assignment(tf.constant(cost)).numpy(), [0, 1])
