"""Building the tf.distribute strategy: the one place that chooses devices.

    one_device    the first GPU, else the CPU
    mirrored      all local GPUs, else the logical CPUs made by `cpu_replicas`
    multi_worker  MultiWorkerMirroredStrategy over the cluster in TF_CONFIG
    auto          multi_worker when TF_CONFIG names more than one task, else mirrored when there
                  are several GPUs or logical CPUs, else one_device

`split_cpu(n)` must run before TensorFlow initialises its devices (before the first op).
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from runtime.errors import InvalidInput
from train.config import STRATEGIES


def split_cpu(replicas: int) -> None:
    """Split the physical CPU into `replicas` logical devices (for testing on a CPU machine)."""
    if replicas <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == replicas:
        return
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)])


def _cluster_tasks() -> int:
    config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    return sum(len(v) for v in config.get("cluster", {}).values())


def make_strategy(name: str = "auto", cpu_replicas: int = 1) -> tf.distribute.Strategy:
    """The strategy `name` (one of STRATEGIES); see the module docstring."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    if name == "auto":
        if _cluster_tasks() > 1:
            name = "multi_worker"
        elif len(tf.config.list_physical_devices("GPU")) > 1 or cpu_replicas > 1:
            name = "mirrored"
        else:
            name = "one_device"
    if name == "multi_worker":
        if _cluster_tasks() < 1:
            raise InvalidInput("--strategy=multi_worker needs a TF_CONFIG environment variable "
                               "describing the cluster")
        return tf.distribute.MultiWorkerMirroredStrategy()
    split_cpu(cpu_replicas)
    gpus = tf.config.list_logical_devices("GPU")
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


def input_pipelines(strategy: tf.distribute.Strategy) -> int:
    """Input pipelines of `strategy`: one per worker of a cluster (each reads its shard)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    spec = resolver.cluster_spec()
    return max(1, sum(spec.num_tasks(job) for job in spec.jobs if job in ("chief", "worker")))
