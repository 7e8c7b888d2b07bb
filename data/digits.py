"""The embedded dataset: scikit-learn's bundled copy of the UCI handwritten digits.

1797 grey 8x8 images with values 0..16, scaled here to [0, 1], and their labels 0..9. No
network, no files: the default dataset of every binary. The fixed split puts image `i` in the
test split when `i % 3 == 2` (599 images; each class has 54-63 of them) and the other 1198 in
train; pretraining uses train only.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

NUM_IMAGES = 1797
TEST_EVERY = 3
SPLITS = ("train", "test")


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: images float32 [1797, 8, 8, 1] in [0, 1] (pixel / 16), labels int64
    [1797] in 0..9, in scikit-learn's order."""
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[..., None]
    return images, digits.target.astype(np.int64)


def split_indices(split: str) -> np.ndarray:
    """Positions in `digits_arrays()` of a split: test when i % 3 == 2, train otherwise."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    index = np.arange(NUM_IMAGES)
    is_test = index % TEST_EVERY == TEST_EVERY - 1
    return index[is_test] if split == "test" else index[~is_test]


def split_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a split, in increasing position order."""
    images, labels = digits_arrays()
    position = split_indices(split)
    return images[position], labels[position]


KEY_PREFIX = "digits:"


def key(split: str, position: int) -> str:
    """The name of digit `position` of a split, as feature extraction lists it."""
    return f"{KEY_PREFIX}{split}/{position}"


def from_key(name: str) -> tuple[np.ndarray, int]:
    """(uint8 [8, 8] image, label) of a digit named by `key`."""
    split, _, position = name[len(KEY_PREFIX):].partition("/")
    images, labels = split_arrays(split)
    i = int(position)
    return np.round(images[i, :, :, 0] * 255).astype(np.uint8), int(labels[i])


def encoded(split: str = "test") -> list[tuple[str, bytes]]:
    """[(key, PNG bytes)] of every digit of a split: grey 8x8, round(255 x pixel / 16)."""
    images, _ = split_arrays(split)
    out = []
    for i, image in enumerate(np.round(images[..., 0] * 255).astype(np.uint8)):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        out.append((key(split, i), buffer.getvalue()))
    return out
