"""The network's forward pass in the training step, compiled with XLA on request.

    network_forward(model, strategy, input_shape, jit_compile, log) -> (forward, compiled)

`forward(images)` is `model(images, training=True)`; with `jit_compile` it is a
`tf.function(jit_compile=True)`. Called inside the step's GradientTape, the compiled function
is one XLA computation, and so is its gradient: TensorFlow gives the forward and backward
functions it derives from a jit-compiled function the same must-compile attribute. Everything
else in the step stays outside: NAT's targets, the Hungarian (`tf.py_function`, which XLA
cannot run) and the assignment update, SC's window sampling and loss, the weight decay, the
loss scaling and the optimizer. So the compiled step takes the same decisions as the plain
one (the same permutation, the same loss), up to the rounding of XLA's fused kernels.

XLA is not used, and `log` gets one line saying why, when
- the strategy has more than one replica: synchronized BN all-reduces the batch moments
  across replicas inside the forward pass, and the step is compiled for one replica only;
- the forward pass cannot be traced inside the strategy as a nested function (a
  MirroredStrategy, even over one device, all-reduces through `merge_call`, which a nested
  function cannot contain);
- it cannot be lowered to XLA (an op without an XLA kernel).
The last two are found before training by tracing a zero batch in the strategy and lowering
it to HLO (`experimental_get_compiler_ir`); neither runs anything, so no state changes.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import keras
import tensorflow as tf


def _reason(error: BaseException) -> str:
    """A short reason from an error of tracing or lowering: the op XLA has no kernel for, or
    the first sentence of the innermost exception's message."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    kernel = re.search(r"No registered '(\w+)' OpKernel for (\w+) devices", text)
    if kernel:
        return f"no {kernel[2]} kernel for the op {kernel[1]}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        match = re.match(r"\w+(Error|Exception): (.*)", line)
        if match:
            message = match[2]
            if message.startswith("Exception encountered when calling") and i + 1 < len(lines):
                message = lines[i + 1]
            return message.split(". ")[0].rstrip(".")
    return (lines or [type(error).__name__])[0]


def _why_not_compiled(forward: Callable, strategy: tf.distribute.Strategy,
                      input_shape: tuple[int, ...]) -> str | None:
    replicas = strategy.num_replicas_in_sync
    if replicas > 1:
        return (f"not used with {replicas} replicas (synchronized batch norm all-reduces "
                "inside the forward pass)")
    images = tf.zeros((2, *input_shape))
    probe = tf.function(forward, jit_compile=True)

    def replica_step(x):  # called from a plain function, as the training step calls it
        return probe(x)

    try:
        tf.function(lambda x: strategy.run(replica_step, args=(x,))).get_concrete_function(
            images)
        probe.experimental_get_compiler_ir(images)(stage="hlo")
    except Exception as error:  # whatever tracing or the XLA bridge raises: fall back
        return f"XLA cannot compile the forward pass ({_reason(error)})"
    return None


def network_forward(model: keras.Model, strategy: tf.distribute.Strategy,
                    input_shape: tuple[int, ...], jit_compile: bool,
                    log: Callable[[str], None] = print) -> tuple[Callable, bool]:
    """(forward, compiled): `forward(images)` = `model(images, training=True)`, XLA-compiled
    when `jit_compile` is set and possible (module docstring); `compiled` says which.

    `input_shape` is the per-example shape (H, W, C) of the images.
    """

    def forward(images):
        return model(images, training=True)

    if not jit_compile:
        return forward, False
    why = _why_not_compiled(forward, strategy, tuple(input_shape))
    if why is not None:
        log(f"--jit_compile: {why}; the network runs uncompiled")
        return forward, False
    return tf.function(forward, jit_compile=True), True
