"""NAT's global scope under tf.distribute: one B x B solve per step in the whole cluster.

The oracle is the global scope as it was before the solve moved to replica 0 alone: every
replica solved the same gathered problem and replica 0's permutation was kept. The one-solve
step must give the same assignment, losses, statistics and gradients bit for bit, with one call
of the solver per re-assigning step instead of one per replica.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import losses.nat as nat_module
from losses import cross_replica
from losses.nat import NoiseAsTargets, _pairwise_sq_dist, optimal_assignment
from tests.helpers import (
    ROOT,
    free_ports,
    is_permutation,
    test_env,
    two_replica_strategy,
)

N, DIM, LOCAL_BATCH = 64, 8, 4
# Tensor, tensor, Python-bool (a constant: no tf.cond) and tensor `reassign` of each step.
SCHEDULE = (True, False, "static", True)


class _EveryReplicaSolves(NoiseAsTargets):
    """The oracle: every replica solves the gathered B x B problem; replica 0's answer is kept."""

    def _reassign_global(self, ids, features, reassign, static_reassign, batch):
        global_features = cross_replica.all_gather(tf.stop_gradient(features))
        global_ids = cross_replica.all_gather(ids)
        global_batch = tf.shape(global_ids)[0]

        def solve():
            global_targets = self.vectors(global_ids)
            return optimal_assignment(_pairwise_sq_dist(global_features, global_targets))

        if static_reassign is None:
            perm = tf.cond(reassign, solve, lambda: tf.range(global_batch, dtype=tf.int32))
        else:
            perm = solve()
        perm = cross_replica.all_gather(perm)[:global_batch]
        offset = cross_replica.replica_offset(batch)
        new_ids = tf.gather(global_ids, perm[offset:offset + batch])
        return new_ids, self.vectors(new_ids)


@contextlib.contextmanager
def _counting_solves():
    """Counts the calls of the module's host solver (one list item per call)."""
    calls: list[int] = []
    real = nat_module._solve_assignment

    def counting(cost):
        calls.append(1)
        return real(cost)

    nat_module._solve_assignment = counting
    try:
        yield calls
    finally:
        nat_module._solve_assignment = real


def _unit_rows(rng: np.random.Generator, b: int, d: int) -> np.ndarray:
    z = rng.normal(size=(b, d)).astype(np.float32)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def _batches(replicas: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(indices [R*b], features [R*b, d]) of every step of SCHEDULE, distinct indices each."""
    rng = np.random.default_rng(5)
    return [(rng.choice(N, replicas * LOCAL_BATCH, replace=False).astype(np.int32),
             _unit_rows(rng, replicas * LOCAL_BATCH, DIM)) for _ in SCHEDULE]


def _split(strategy, array: np.ndarray):
    """A distributed value whose replica r holds rows [r*b, (r+1)*b) of `array` (cluster-wide
    replica ids under MultiWorkerMirroredStrategy)."""
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(array[ctx.replica_id_in_sync_group * LOCAL_BATCH:
                                      (ctx.replica_id_in_sync_group + 1) * LOCAL_BATCH]))


def _run(strategy, cls) -> tuple[list, list[int], list[list[np.ndarray]]]:
    """SCHEDULE's steps of a global-scope `cls` module: (this process's replicas' outputs of
    every step as bytes, solver calls in this process per step, assignment copies per step)."""
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        nat = cls(N, DIM, seed=5, scope="global")

    def replica_step(indices, features, reassign):
        with tf.GradientTape() as tape:
            tape.watch(features)
            loss, stats = nat(indices, features, reassign)
        return loss, stats, tape.gradient(loss, features)

    @tf.function
    def step(indices, features, reassign):
        out = strategy.run(replica_step, args=(indices, features, reassign))
        return tf.nest.map_structure(strategy.experimental_local_results, out)

    outputs, counts, copies = [], [], []
    with _counting_solves() as calls:
        for (idx, z), reassign in zip(_batches(replicas), SCHEDULE, strict=True):
            flag = True if reassign == "static" else tf.constant(reassign)
            start = len(calls)
            out = step(_split(strategy, idx), _split(strategy, z), flag)
            counts.append(len(calls) - start)
            outputs.append([(t.dtype.name, t.shape.as_list(), t.numpy().tobytes())
                            for t in tf.nest.flatten(out)])
            copies.append([v.numpy() for v in getattr(nat.assignment, "values", [nat.assignment])])
    return outputs, counts, copies


def _compare(strategy, solver_process: bool = True) -> dict:
    """Runs the one-solve module and the oracle on the same steps; asserts they agree bit for
    bit and that the solver runs once per re-assigning step (in the process of replica 0)."""
    local = len(strategy.extended.worker_devices)
    new_out, new_counts, new_copies = _run(strategy, NoiseAsTargets)
    old_out, old_counts, old_copies = _run(strategy, _EveryReplicaSolves)
    assert new_out == old_out
    for new, old in zip(new_copies, old_copies, strict=True):
        for copy in new + old:
            np.testing.assert_array_equal(copy, old[0])
        assert is_permutation(old[0])
    solving = [0 if reassign is False else 1 for reassign in SCHEDULE]
    assert old_counts == [local * s for s in solving]  # the counter sees every replica's solve
    assert new_counts == (solving if solver_process else [0] * len(SCHEDULE))
    assert not np.array_equal(new_copies[0][0], new_copies[-1][0])  # targets were traded
    return {"assignment": new_copies[-1][0].tolist(), "new_counts": new_counts,
            "old_counts": old_counts}


def test_two_replicas_solve_once_per_step_and_match_every_replica_solving():
    _compare(two_replica_strategy())


def test_a_replica_id_known_only_at_run_time_still_solves_once(monkeypatch):
    # On a TPU the replica id is a run-time tensor: the solve then sits in a tf.cond.
    monkeypatch.setattr(cross_replica, "is_first_replica",
                        lambda: tf.equal(cross_replica.replica_id(), 0))
    _compare(two_replica_strategy())


def test_one_device_solves_once_per_step_and_matches_the_oracle():
    _compare(tf.distribute.OneDeviceStrategy("/cpu:0"))


def test_the_sharded_assignment_is_the_single_device_one():
    single = NoiseAsTargets(N, DIM, seed=5, scope="global")
    for (idx, z), reassign in zip(_batches(2), SCHEDULE, strict=True):
        single(tf.constant(idx), tf.constant(z), reassign is not False)
    _, _, copies = _run(two_replica_strategy(), NoiseAsTargets)
    np.testing.assert_array_equal(copies[-1][0], single.assignment.numpy())


def four_replicas_main() -> None:
    """`python -c` entry of the four-replica test: four logical CPUs, then the comparison."""
    from train.strategy import split_cpu

    split_cpu(4)
    _compare(tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(4)]))
    print("four replicas: ok")


def worker_main() -> None:
    """`python -c` entry of one worker of the multi-worker test (TF_CONFIG names the cluster)."""
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    first = strategy.cluster_resolver.task_id == 0
    print(json.dumps(_compare(strategy, solver_process=first)))


def _python(code: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=test_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_four_replicas_solve_once_per_step_and_match_every_replica_solving():
    process = _python(f"from {__name__} import four_replicas_main; four_replicas_main()")
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert "four replicas: ok" in out


@pytest.mark.slow
def test_two_workers_solve_once_in_the_cluster_and_agree():
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = [
        _python(f"from {__name__} import worker_main; worker_main()",
                TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                      "task": {"type": "worker", "index": index}}))
        for index in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    solving = [0 if reassign is False else 1 for reassign in SCHEDULE]
    assert reports[0]["new_counts"] == solving  # the first worker's replica solves
    assert reports[1]["new_counts"] == [0] * len(SCHEDULE)  # the other does no host work
    assert reports[0]["old_counts"] == reports[1]["old_counts"] == solving
    assert reports[0]["assignment"] == reports[1]["assignment"]
    single = NoiseAsTargets(N, DIM, seed=5, scope="global")
    for (idx, z), reassign in zip(_batches(2), SCHEDULE, strict=True):
        single(tf.constant(idx), tf.constant(z), reassign is not False)
    np.testing.assert_array_equal(reports[0]["assignment"], single.assignment.numpy())

