"""How often an SC positive is the nearest window of its batch, by window shift and pooling.

    python -m benchmarks.sc_windows [--model=nin_mnist --window=6 --batch=128 --inits=3]

Protocol: the `sc` map of a network at random initialisation (BN in training mode, as in the
SC step; --notraining for inference mode) on batches of
the embedded digits (train split). For every pair of window offsets of a `window` x `window`
window on the map, window 1 of each image is an anchor and window 2 of every image of the
batch a contrast; the row reports how often the anchor's own contrast is its nearest (L2), for
windows averaged over their cells ("avg") and flattened cell by cell ("flatten"), grouped by
the shift between the two windows. Chance is 1 / batch. With independent uniform offsets on a
7 x 7 map and 6 x 6 windows, the two windows coincide in 1/4 of the pairs, are shifted along
one axis in 1/2 and along both in 1/4.

This is the measurement behind the reading of `losses/spatial_contrasting.py`: flattened
windows at different offsets compare different parts of the image.
"""

from __future__ import annotations

import itertools

from runtime.cli import quiet_tensorflow

quiet_tensorflow()  # the zoo's quiet start: no TensorFlow start-up lines

import keras
import numpy as np
from absl import app, flags

from data import digits
from data.images import resize_to_input
from models import build_model

_MODEL = flags.DEFINE_string("model", "nin_mnist", "Network (at random init).")
_WINDOW = flags.DEFINE_integer("window", 6, "Window side in cells.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 128, "Images per batch (the contrasts).", lower_bound=2)
_INITS = flags.DEFINE_integer("inits", 3, "Random initialisations (seeds 0..n-1).", lower_bound=1)
_TRAINING = flags.DEFINE_bool("training", True, "BN in training mode (batch statistics), as "
                              "when the SC loss is computed.")


def _nearest_is_own(anchors: np.ndarray, contrasts: np.ndarray) -> float:
    sq = ((anchors[:, None, :] - contrasts[None, :, :]) ** 2).sum(-1)
    return float(np.mean(np.argmin(sq, axis=1) == np.arange(len(anchors))))


def _window(maps: np.ndarray, top: int, left: int, side: int, pool: str) -> np.ndarray:
    cells = maps[:, top:top + side, left:left + side, :]
    return cells.mean(axis=(1, 2)) if pool == "avg" else cells.reshape(len(maps), -1)


def main(argv):
    del argv
    images = digits.split_arrays("train")[0]
    rates: dict[tuple[str, str], list[float]] = {}
    for seed in range(_INITS.value):
        keras.utils.set_random_seed(seed)
        model = build_model(_MODEL.value, head="none")
        x = resize_to_input(images, model.input_shape[1:]).numpy()
        for start in range(0, len(x) - _BATCH.value + 1, _BATCH.value):
            maps = model(x[start:start + _BATCH.value], training=_TRAINING.value)["sc"].numpy()
            positions = range(maps.shape[1] - _WINDOW.value + 1)
            for (r1, c1), (r2, c2) in itertools.product(
                    itertools.product(positions, positions), repeat=2):
                shift = {0: "same window", 1: "shifted on one axis", 2: "shifted on both"}[
                    (r1 != r2) + (c1 != c2)]
                for pool in ("flatten", "avg"):
                    a = _window(maps, r1, c1, _WINDOW.value, pool)
                    c = _window(maps, r2, c2, _WINDOW.value, pool)
                    rates.setdefault((shift, pool), []).append(_nearest_is_own(a, c))
    mode = "training" if _TRAINING.value else "inference"
    print(f"{_MODEL.value} `sc` map at random init (BN in {mode} mode), "
          f"{_WINDOW.value}x{_WINDOW.value} windows, "
          f"batches of {_BATCH.value} digits, {_INITS.value} inits; chance "
          f"{100 / _BATCH.value:.1f}%\n")
    print(f"| {'windows':<20} | {'flatten':>8} | {'avg':>8} |")
    print(f"|{'-' * 22}|{'-' * 10}|{'-' * 10}|")
    for shift in ("same window", "shifted on one axis", "shifted on both"):
        if (shift, "avg") in rates:
            print(f"| {shift:<20} | {100 * np.mean(rates[shift, 'flatten']):>7.1f}% | "
                  f"{100 * np.mean(rates[shift, 'avg']):>7.1f}% |")


if __name__ == "__main__":
    app.run(main)
