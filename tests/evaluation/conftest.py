"""Fixtures of the evaluation tests: a dataset whose answer is known."""

import numpy as np
import pytest
import tensorflow as tf

from data import labelled
from evaluation import classifiers

CLASSES = 10


@pytest.fixture
def separable(monkeypatch):
    """Replace the dataset readers by a 10-class set whose 4x4 images are linearly separable
    by construction (class c lights pixel c), and record every read in order."""
    log = []
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", 300), ("test", 200)):
        labels = np.arange(n) % CLASSES
        images = rng.normal(0.0, 0.05, size=(n, 16)).astype(np.float32)
        images[np.arange(n), labels] += 1.0
        data[split] = (images.reshape(n, 4, 4, 1), labels.astype(np.int64))

    def load_labels(dataset, split):
        log.append(("labels", split))
        return data[split][1]

    def load(dataset, split, input_shape, indices=None):
        log.append(("images", split))
        images, labels = data[split]
        if indices is not None:
            images, labels = images[np.unique(indices)], labels[np.unique(indices)]
        return tf.data.Dataset.from_tensor_slices((images, labels))

    fit_classifier = classifiers.fit_classifier

    def logged_fit(*args, **kwargs):
        log.append(("fit", None))
        return fit_classifier(*args, **kwargs)

    monkeypatch.setattr(labelled, "load_labels", load_labels)
    monkeypatch.setattr(labelled, "load", load)
    monkeypatch.setattr(classifiers, "fit_classifier", logged_fit)
    return log
