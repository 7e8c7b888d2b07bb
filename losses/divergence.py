"""A diverged training loop stops: a NaN or Inf loss ends it with one line naming the step.

Every training loop of the zoo checks its losses: pretraining (train/trainer.py, on the
replicas' flags of a bad step), fine-tuning (evaluation/finetune_lib.py) and the VOC loops
(evaluation/voc/common.py). The step whose loss is not finite is the last one run, nothing is
saved after it, and the binary prints the message and exits with status 1: a diverged run is
the user's to fix (a smaller learning rate, say), not a bug. Without the check a diverged
fine-tune would have its learning rate cut on a loss that never improves and be reported as
"converged".
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from runtime.errors import UserError


class NonFiniteLoss(UserError):
    """A loss became NaN or Inf; the one-line message names the step and what was kept."""


def check_finite(losses: Mapping[str, float], step: int, where: str, kept: str) -> None:
    """Raise NonFiniteLoss when a loss of `step` is NaN or Inf.

    Args:
      losses: {name: value} of the step.
      step: the step (counted from 1 over the whole run).
      where: what was training, e.g. "fine-tuning pretrained, seed 0 (epoch 3)".
      kept: what stays as it was, e.g. "the last good checkpoint is .../ckpt-20".
    """
    bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
    if bad:
        values = ", ".join(f"{name} {value}" for name, value in bad.items())
        raise NonFiniteLoss(f"{where}: loss is not finite at step {step} ({values}); stopped: "
                            f"{kept}")
