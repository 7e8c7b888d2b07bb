"""Mixed precision, the network's half: the dtype policy a network is built under.

    policy_scope(precision)                 create layers under the policy of `precision`
    float32_copy(model, name, **kwargs)     the same network in float32, with its weights

Precisions (`models.PRECISIONS`): "none" is float32 throughout; "bf16" and "fp16" are
Keras's "mixed_bfloat16" and "mixed_float16" policies: layers keep float32 variables and
compute in bfloat16 / float16. What stays float32 in the zoo, and why:
- the input (`keras.Input` is float32; the first layer casts it);
- batch normalisation: Keras computes the batch moments and the normalisation in float32 and
  keeps gamma, beta and the moving statistics float32, casting only its output;
- the heads: NAT's embedding (its Dense layer and the L2 normalisation) and the logits are
  float32 layers, so NAT's features, targets, cost matrix, Hungarian input and square loss
  are float32; SC casts its windows to float32 before pooling, and its distances and
  log-sum-exp are float32 (losses/spatial_contrasting.py);
- the loss, its average over the global batch, the weight decay and the gradients applied
  to the (float32) variables.

Keras keeps the policy in one global (per thread). `policy_scope` sets it only while a
network's layers are created, and every layer keeps the policy it was created with, so the
other models of the process (a probe's random-init twin, tests) are float32 unless they are
built in a scope of their own.

The loss-scaled step of float16 training is the loops' half: losses/loss_scale.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras

from models import PRECISIONS, build_model

POLICIES = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def policy_name(precision: str) -> str:
    """The Keras dtype policy of a precision of `models.PRECISIONS`."""
    if precision not in POLICIES:
        raise ValueError(f"unknown precision {precision!r}; choose one of "
                         f"{', '.join(PRECISIONS)}")
    return POLICIES[precision]


@contextlib.contextmanager
def policy_scope(precision: str) -> Iterator[None]:
    """Layers created inside take the dtype policy of `precision`; the previous global
    policy is restored on exit (the layers keep theirs)."""
    name = policy_name(precision)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def float32_copy(model: keras.Model, name: str, **kwargs) -> keras.Model:
    """`build_model(name, **kwargs)` in float32 holding `model`'s weights: what an export
    serves, whatever the precision the network was trained in."""
    copy = build_model(name, precision="none", **kwargs)
    copy.set_weights(model.get_weights())
    return copy
