"""Labelled datasets: digits, STL-10 binaries and folds, tfds via mock_data, draws."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from data import digits
from data import labelled as datasets


def test_load_digits_resizes_to_the_model_input():
    ds = datasets.load("digits", "train", (28, 28, 3), indices=np.array([5, 0]))
    (x0, y0), (_, y1) = list(ds.as_numpy_iterator())
    images, labels = digits.digits_arrays()
    train = digits.split_indices("train")
    assert (y0, y1) == (labels[train[0]], labels[train[5]])  # increasing position order
    expected = tf.image.resize(images[train[0]][None], (28, 28), antialias=True)[0].numpy()
    assert x0.shape == (28, 28, 3) and x0.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(x0[..., c], expected[..., 0], atol=1e-6)


def test_per_class_draw_takes_k_of_each_class():
    labels = np.array([0, 1, 2] * 5 + [2, 2])
    draw = datasets.per_class_draw(labels, 3, np.random.default_rng(0))
    assert len(draw) == 9 and len(set(draw)) == 9
    np.testing.assert_array_equal(np.bincount(labels[draw]), [3, 3, 3])
    again = datasets.per_class_draw(labels, 3, np.random.default_rng(0))
    np.testing.assert_array_equal(draw, again)


def test_per_class_draw_rejects_k_larger_than_a_class():
    labels = np.array([0] * 6 + [1] * 4)
    with pytest.raises(datasets.LabelsPerClassError, match=r"class 1 .*\(4 examples\)"):
        datasets.per_class_draw(labels, 5, np.random.default_rng(0), what="toy train")


def test_split_validation_is_stratified_and_disjoint():
    labels = np.array([0] * 10 + [1] * 5 + [2])
    fit, val = datasets.split_validation(labels, 0.2, np.random.default_rng(1))
    assert not set(fit) & set(val)
    np.testing.assert_array_equal(np.sort(np.concatenate([fit, val])), np.arange(16))
    # round(0.2 * 10) = 2, max(1, round(0.2 * 5)) = 1, a single example stays in fit
    np.testing.assert_array_equal(np.bincount(labels[val], minlength=3), [2, 1, 0])


def test_unknown_dataset_and_split_name_the_choices():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; choose one of digits, mnist"):
        datasets.LabelledSource("svhn")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        datasets.load_labels("digits", "val")


def _write_stl10(directory, n_train=20, n_test=6):
    """Fake STL-10 binaries: image i has value (i + 7 c) at (row, col) = (0, 0) of channel c,
    written in the archive's channel-major, column-major layout; labels 1..10."""
    os.makedirs(directory)
    for split, n in (("train", n_train), ("test", n_test)):
        raw = np.zeros((n, 3, 96, 96), np.uint8)  # [N, C, col, row] once transposed
        for i in range(n):
            for c in range(3):
                raw[i, c, 0, 0] = i + 7 * c
            raw[i, 0, 5, 2] = 200  # column 5, row 2 of channel 0
        raw.tofile(os.path.join(directory, f"{split}_X.bin"))
        (np.arange(n) % 10 + 1).astype(np.uint8).tofile(os.path.join(directory, f"{split}_y.bin"))
    folds = [np.arange(n_train)[(np.arange(n_train) + f) % 10 == 0] for f in range(10)]
    with open(os.path.join(directory, "fold_indices.txt"), "w") as f:
        f.write("\n".join(" ".join(map(str, fold)) for fold in folds) + "\n")
    return folds


def test_stl10_binary_decoding_and_folds(tmp_path):
    directory = str(tmp_path / "stl10_binary")
    folds = _write_stl10(directory)
    images, labels = datasets.stl10_binary_arrays(directory, "train")
    assert images.shape == (20, 96, 96, 3)
    np.testing.assert_array_equal(labels, np.arange(20) % 10)
    np.testing.assert_array_equal(images[3, 0, 0], [3, 10, 17])
    assert images[3, 2, 5, 0] == 200  # row 2, column 5
    read = datasets.stl10_folds(directory)
    assert len(read) == 10
    for a, b in zip(read, folds, strict=True):
        np.testing.assert_array_equal(a, b)
    source = datasets.LabelledSource("stl10", manual_dir=str(tmp_path))
    assert datasets.stl10_directory(source) == directory
    x, y = datasets.load_arrays(datasets.LabelledSource("stl10", stl10_dir=directory), "train",
                                (96, 96, 3), indices=read[1])
    np.testing.assert_array_equal(y, labels[read[1]])
    np.testing.assert_allclose(x[:, 0, 0, 0] * 255, read[1], atol=1e-4)


def _cifar_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    del self, decoders, read_config, shuffle_files
    n = 12 if split == "train" else 5
    offset = 0 if split == "train" else 100

    def example(i):
        image = np.full((32, 32, 3), (i + offset) % 256, np.uint8)
        return {"image": image, "label": np.int64(i % 10), "id": f"{i}"}

    return tf.data.Dataset.from_generator(
        lambda: (example(i) for i in range(n)),
        output_signature={"image": tf.TensorSpec((32, 32, 3), tf.uint8),
                          "label": tf.TensorSpec((), tf.int64),
                          "id": tf.TensorSpec((), tf.string)})


def test_tfds_paths_with_mock_data(tmp_path):
    source = datasets.LabelledSource("cifar10", data_dir=str(tmp_path))
    with tfds.testing.mock_data(as_dataset_fn=_cifar_as_dataset, data_dir=str(tmp_path)):
        np.testing.assert_array_equal(datasets.load_labels(source, "train"), np.arange(12) % 10)
        x, y = datasets.load_arrays(source, "train", (16, 16, 1), indices=np.array([7, 2, 11]))
        test_x, test_y = datasets.load_arrays(source, "test", (32, 32, 3))
    np.testing.assert_array_equal(test_y, np.arange(5) % 10)
    np.testing.assert_array_equal(y, [2, 7, 1])
    assert x.shape == (3, 16, 16, 1)
    np.testing.assert_allclose(x[:, 0, 0, 0], np.array([2, 7, 11]) / 255.0, rtol=1e-5)
    assert test_x.shape == (5, 32, 32, 3)
    np.testing.assert_allclose(test_x[:, 3, 3, 1], (np.arange(5) + 100) / 255.0, rtol=1e-6)


def test_imagenet_test_split_is_tfds_validation():
    assert datasets.TFDS_SPLIT["imagenet2012"] == {"train": "train", "test": "validation"}
    assert datasets.NUM_CLASSES["imagenet2012"] == 1000
