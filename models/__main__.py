"""`python -m models`: one row per model with its input, parameters and endpoint shapes."""

from __future__ import annotations

import numpy as np

from models import MODEL_NAMES, build_model
from runtime import cli

# The head each model is pretrained or evaluated with by default.
_DEFAULT_HEAD = {"alexnet": "nat"}


def _count(weights) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


def model_table() -> str:
    """The zoo as a plain-text table (one block of rows per model)."""
    rows = [("model", "input", "trainable", "frozen", "endpoint", "shape")]
    for name in MODEL_NAMES:
        head = _DEFAULT_HEAD.get(name, "softmax")
        model = build_model(name, head=head)
        first = True
        for endpoint, tensor in model.output.items():
            shape = "x".join(str(d) for d in tensor.shape[1:])
            if first:
                rows.append((f"{name} ({head})", "x".join(str(d) for d in model.input.shape[1:]),
                             f"{_count(model.trainable_weights):,}",
                             f"{_count(model.non_trainable_weights):,}", endpoint, shape))
                first = False
            else:
                rows.append(("", "", "", "", endpoint, shape))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    cli.quiet_tensorflow()
    print(model_table())
