"""Test session setup.

The CPU is split into two logical devices before TensorFlow initialises its runtime, so that
distributed tests can build a two-replica MirroredStrategy on a CPU-only machine. Single-device
code is unaffected: it runs on the first logical CPU.
"""

from runtime.cli import quiet_tensorflow

quiet_tensorflow()  # as the binaries start: TensorFlow's start-up lines are not shown

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)
