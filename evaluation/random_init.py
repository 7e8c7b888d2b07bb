"""The random-init baseline, defined: two rows, and the stronger one as the reference.

A network at its seeded initialisation can be read two ways in inference mode:

- "random init, BN at init": its BN layers keep their initial moving statistics (mean 0,
  variance 1) and normalise nothing;
- "random init, BN calibrated": the same weights, with every BN layer's moving statistics set
  to the exact statistics of its inputs over the pretraining images
  (`models.batchnorm.calibrate_batchnorm`): what the pretraining's first step would have seen
  had the whole dataset been one batch, and no label or gradient involved.

Neither is "the" random baseline: which is stronger depends on the view (calibration helps a
linear probe and can hurt nearest neighbours), so a comparison reports both and measures the
pretrained network's paired gap against the one with the higher mean accuracy over the same
draws (`stronger`), saying which.

The calibration images are the pretraining dataset's own images (`data.pretrain`, in its fixed
order, unaugmented, at the model's input size), at most MAX_CALIBRATION_IMAGES of them (all
1198 train digits of `digits`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf

from data.images import resize_to_input
from data.pretrain import open_source
from models.batchnorm import calibrate_batchnorm

AT_INIT = "random init, BN at init"
CALIBRATED = "random init, BN calibrated"
RANDOM_INITS = (AT_INIT, CALIBRATED)
MAX_CALIBRATION_IMAGES = 50_000


def pretraining_images(dataset: str, input_shape: Sequence[int], data_dir: str | None = None,
                       manual_dir: str | None = None, files: Sequence[str] | None = None,
                       limit: int = MAX_CALIBRATION_IMAGES) -> tf.data.Dataset:
    """The first `limit` images of a pretraining dataset (`data.pretrain.open_source`), in its
    fixed order, unaugmented, as an unbatched Dataset of float32 [H, W, C] in [0, 1].

    `files`: a folder run's recorded file list (images.txt); unreadable files are left out.
    """
    shape = tuple(int(d) for d in input_shape)
    source = open_source(dataset, shape, data_dir, manual_dir, files)
    center = source.name == "imagenet2012"

    def image(index, raw):
        decoded = source.decode(raw)
        return decoded if source.fixed_size else resize_to_input(decoded, shape,
                                                                 center_crop=center)

    ds = source.elements().take(limit).map(image, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.ignore_errors() if source.paths else ds


def calibrated(model, images) -> object:
    """`model` with its BN statistics calibrated on `images` (in place; returned)."""
    calibrate_batchnorm(model, images)
    return model


def stronger(accuracies: Mapping[str, Sequence[float]]) -> str:
    """The name of the row with the higher mean accuracy (the first on a tie)."""
    if not accuracies:
        raise ValueError("no random-init rows to choose from")
    return max(accuracies, key=lambda name: float(np.mean(accuracies[name])))
