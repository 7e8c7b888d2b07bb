"""train/cluster.py without a cluster: the lost-worker line, the non-chief's checkpoint copy,
the refusal of another cluster size, and every worker restoring from the run folder. The
two-process runs are in tests/train/test_multi_worker_faults.py."""

from __future__ import annotations

import os
import re
import types

import pytest
import tensorflow as tf

from models.checkpoints import open_checkpoints
from runtime.ownership import RunMismatch, claim_run, release_run, start_run
from train import cluster

ADDRESSES = ["10.0.0.1:2222", "10.0.0.2:2222"]
UNHEALTHY = ("Collective ops is aborted by: Error reported from /job:worker/task:1: The "
             "following tasks are unhealthy (stopped sending heartbeats):\n"
             "/job:worker/replica:0/task:1\nThe tasks have crashed.")


def _worker(index: int):
    """A stand-in for a MultiWorkerMirroredStrategy on task `index` of two workers."""
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": ADDRESSES}), task_type="worker", task_id=index)
    return types.SimpleNamespace(cluster_resolver=resolver,
                                 extended=types.SimpleNamespace(should_checkpoint=index == 0))


def _save(folder: str, value: float, number: int) -> str:
    _, manager, _ = open_checkpoints(folder, {"v": tf.Variable(value)}, keep=1)
    return manager.save(checkpoint_number=number)


def test_a_lost_peer_is_one_line_naming_its_task_and_the_last_checkpoint(tmp_path):
    error = tf.errors.UnavailableError(None, None, UNHEALTHY)
    with pytest.raises(cluster.WorkerLost) as lost:
        cluster.raise_if_lost(error, _worker(0), 7, str(tmp_path))
    assert str(lost.value) == (
        "worker 1 (10.0.0.2:2222) stopped responding at step 7; the last complete checkpoint "
        "is none (the run starts afresh): restart every worker with the same command")
    prefix = _save(str(tmp_path), 1.0, 6)
    chief_gone = tf.errors.UnavailableError(None, None, "Socket closed\nfrom remote target "
                                            "/job:worker/replica:0/task:0 calling GetKeyValue")
    with pytest.raises(cluster.WorkerLost, match=rf"^worker 0 \(10\.0\.0\.1:2222\) stopped "
                       rf"responding at step 7; the last complete checkpoint is "
                       rf"{re.escape(prefix)}: "):
        cluster.raise_if_lost(chief_gone, _worker(1), 7, str(tmp_path))
    # Other errors, and any error without a cluster, are left to the caller.
    cluster.raise_if_lost(tf.errors.InvalidArgumentError(None, None, UNHEALTHY), _worker(0), 7,
                          str(tmp_path))
    cluster.raise_if_lost(tf.errors.UnavailableError(None, None, "device busy"), _worker(0), 7,
                          str(tmp_path))
    single = types.SimpleNamespace(cluster_resolver=None, extended=types.SimpleNamespace())
    cluster.raise_if_lost(error, single, 7, str(tmp_path))


def test_a_non_chief_writes_a_copy_under_workers_that_is_swept_and_removed(tmp_path):
    model_dir = str(tmp_path)
    assert cluster.checkpoint_dir(model_dir, _worker(0)) == model_dir
    stale = tmp_path / ".workers" / "worker-1" / "ckpt-4.index"  # a killed process's copy
    stale.parent.mkdir(parents=True)
    stale.write_text("x")
    copy = cluster.checkpoint_dir(model_dir, _worker(1))
    assert copy == os.path.join(model_dir, ".workers", "worker-1") and os.listdir(copy) == []
    other = tmp_path / ".workers" / "worker-2"
    other.mkdir()
    cluster.remove_checkpoint_dir(copy, model_dir)
    assert os.listdir(tmp_path / ".workers") == ["worker-2"]  # another worker's stays
    cluster.remove_checkpoint_dir(str(other), model_dir)
    assert not (tmp_path / ".workers").exists()
    cluster.remove_checkpoint_dir(model_dir, model_dir)  # the chief's: kept
    assert tmp_path.is_dir()


def test_every_worker_restores_the_run_folders_checkpoint(tmp_path):
    model_dir, copy = str(tmp_path / "run"), str(tmp_path / "run" / ".workers" / "worker-1")
    prefix = _save(model_dir, 3.0, 8)
    variable = tf.Variable(0.0)
    _, manager, latest = open_checkpoints(model_dir, {"v": variable}, keep=1, directory=copy)
    assert latest == prefix and float(variable.numpy()) == 3.0
    assert manager.save(checkpoint_number=8) == os.path.join(copy, "ckpt-8")
    assert tf.train.latest_checkpoint(model_dir) == prefix


def test_a_restart_on_another_cluster_size_is_refused_saying_why(tmp_path):
    folder = str(tmp_path / "run")
    start_run(claim_run(folder, {"seed": 0, "workers": 2}))
    release_run(folder)
    with pytest.raises(RunMismatch) as refused:
        cluster.claim(claim_run, folder, lambda: {"seed": 0, "workers": 1})
    assert str(refused.value) == (
        f"{folder} holds a run with other settings (workers: 2 -> 1): rerun with the recorded "
        "settings, or use another --model_dir; a restart needs the run's cluster size, 2 "
        "worker(s), because each worker reads its own shard of the data and the gradients add "
        "up in an order that both depend on that number (the hosts and ports may change)")
    with pytest.raises(RunMismatch) as refused:  # other differences keep their own message
        cluster.claim(claim_run, folder, lambda: {"seed": 1, "workers": 2})
    assert str(refused.value).endswith("or use another --model_dir")
    claim = cluster.claim(claim_run, folder, lambda: {"seed": 0, "workers": 2})
    assert not claim.fresh
    release_run(folder)
