"""Loss scaling for float16 training: the step every training loop of the zoo takes (the
pretraining trainer, fine-tuning, the VOC loops), whatever the precision.

    loss_scaled(optimizer, precision)       the optimizer, in a LossScaleOptimizer for fp16
    scale_loss(optimizer, loss)             the value to differentiate (loss * S for fp16)
    unscaled_gradients(optimizer, tape, target, variables)   true gradients of the loss
    apply_gradients(optimizer, grads, variables)             one step from true gradients
    checkpoint_objects(optimizer)           the optimizer's entries of a checkpoint

The network's half of mixed precision (the dtype policy it is built under, and what stays
float32) is in models/precision.py.

fp16 (largest value 65504, 10-bit mantissa) needs loss scaling, or small gradients
underflow to zero. Keras's dynamic `LossScaleOptimizer` holds a scale S (2^15 at first),
halves it and skips the update when a gradient is not finite, and doubles it after 2000
finite steps in a row. The training loops here differentiate `scale_loss(loss)` = loss * S,
divide the gradients by S (`unscaled_gradients`, so clipping and weight decay see true
gradients) and give them back multiplied by S to the LossScaleOptimizer (`apply_gradients`);
S is a power of two, so dividing and multiplying by it is exact. Under tf.distribute each
replica scales its share of the global loss, and the optimizer sums the gradients over the
replicas as it does without scaling. A skipped step has still consumed its batch: the inner
optimizer's step counter, which the loops use as their step, is advanced anyway, so the
data stream, the learning-rate schedule and checkpoint numbers stay aligned. The scale and
its growth counter are checkpointed under "loss_scale", so a resumed fp16 run continues with
the same scale. bfloat16 has float32's exponent range and needs no scaling.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

LOSS_SCALE_KEY = "loss_scale"
"""The checkpoint key of the fp16 loss scale (absent from checkpoints of other runs)."""


def loss_scaled(optimizer: keras.optimizers.Optimizer, precision: str
                ) -> keras.optimizers.Optimizer:
    """`optimizer` itself, or for fp16 a dynamic LossScaleOptimizer around it (build the
    result, not the inner optimizer)."""
    if precision == "fp16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _is_scaled(optimizer) -> bool:
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


def scale_loss(optimizer: keras.optimizers.Optimizer, loss: tf.Tensor) -> tf.Tensor:
    """The value to differentiate: loss * S under loss scaling, else the loss. Compute it
    inside the GradientTape."""
    return optimizer.scale_loss(loss) if _is_scaled(optimizer) else loss


def unscaled_gradients(optimizer: keras.optimizers.Optimizer, tape: tf.GradientTape,
                       target: tf.Tensor, variables: Sequence) -> list[tf.Tensor]:
    """d loss / d variables from `target` = `scale_loss(optimizer, loss)`: the gradients
    divided by S under loss scaling (inf or NaN where float16 overflowed)."""
    grads = tape.gradient(target, variables)
    if not _is_scaled(optimizer):
        return grads
    scale = tf.convert_to_tensor(optimizer.dynamic_scale)
    return [None if g is None else g / tf.cast(scale, g.dtype) for g in grads]


def apply_gradients(optimizer: keras.optimizers.Optimizer, grads: Sequence,
                    variables: Sequence) -> None:
    """One optimizer step from true gradients. Under loss scaling: a step whose gradients
    are not all finite is skipped (and S halved) by the LossScaleOptimizer, and still
    counted in `optimizer.iterations` (module docstring)."""
    if not _is_scaled(optimizer):
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return
    iterations = optimizer.iterations
    before = tf.identity(iterations)
    scale = tf.convert_to_tensor(optimizer.dynamic_scale)
    scaled = [None if g is None else g * tf.cast(scale, g.dtype) for g in grads]
    optimizer.apply_gradients(zip(scaled, variables, strict=True))
    # Not a tf.cond: under MirroredStrategy the update of a mirrored counter is a merge_call,
    # which cannot sit in a branch.
    skipped = tf.cast(tf.equal(tf.identity(iterations), before), iterations.dtype)
    iterations.assign_add(skipped)


def checkpoint_objects(optimizer: keras.optimizers.Optimizer) -> dict:
    """{"optimizer": the optimizer's state} and, under loss scaling, {"loss_scale": the scale
    and its growth counter}. The "optimizer" entry is the inner optimizer, so a run can be
    resumed in another precision (pass LOSS_SCALE_KEY as optional to
    `models.checkpoints.open_checkpoints`)."""
    if _is_scaled(optimizer):
        return {"optimizer": optimizer.inner_optimizer, LOSS_SCALE_KEY: optimizer}
    return {"optimizer": optimizer}
