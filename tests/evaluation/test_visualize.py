"""evaluation/visualize.py, visualize_lib.py and figures.py: filter composition, neighbours,
curves, and the PNGs the binary writes."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy.signal import correlate2d

from data import digits
from evaluation import figures
from evaluation.visualize import VisualizeConfig
from evaluation.visualize_lib import (
    PAD,
    _retrieval,
    compose_sobel,
    filter_grid,
    first_conv_filters,
    image_and_label,
    nearest_neighbours,
    read_scalars,
)
from models import build_model
from models.layers import SOBEL_X, SOBEL_Y
from runtime.errors import InvalidInput
from tests.helpers import ROOT, test_env


def test_composed_sobel_filter_equals_the_two_stage_network():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(20, 17))
    kernel = rng.normal(size=(5, 5, 2, 3))
    composed = compose_sobel(kernel)
    assert composed.shape == (7, 7, 3)
    gradients = [correlate2d(image, s, mode="valid") for s in (SOBEL_X, SOBEL_Y)]
    for f in range(3):
        two_stage = sum(correlate2d(gradients[c], kernel[:, :, c, f], mode="valid")
                        for c in range(2))
        one_stage = correlate2d(image, composed[:, :, f], mode="valid")
        np.testing.assert_allclose(one_stage, two_stage, atol=1e-10)
    with pytest.raises(ValueError, match=r"\[k, k, 2, F\] kernel"):
        compose_sobel(np.zeros((5, 5, 3, 2)))


def test_first_conv_filters_per_front():
    sobel = build_model("alexnet", input_shape=(67, 67, 3), head="none")
    filters = first_conv_filters(sobel)
    assert filters.shape == (96, 13, 13, 1)
    kernel = np.asarray(sobel.get_layer("conv1").kernel)
    np.testing.assert_allclose(filters[7, :, :, 0], compose_sobel(kernel)[:, :, 7])
    rgb = build_model("alexnet", input_shape=(67, 67, 3), preprocessing="rgb", head="none")
    assert first_conv_filters(rgb).shape == (96, 11, 11, 3)
    assert first_conv_filters(build_model("nin_mnist")).shape == (32, 5, 5, 1)


def test_filter_grid_layout():
    filters = np.arange(5 * 3 * 3, dtype=np.float64).reshape(5, 3, 3, 1)
    grid = filter_grid(filters, columns=2, scale=4)
    # 3 rows x 2 columns of 12-pixel cells, 1-pixel borders.
    assert grid.shape == (3 * (12 + 1) + 1, 2 * (12 + 1) + 1, 3) and grid.dtype == np.uint8
    cell = grid[PAD:PAD + 12, PAD:PAD + 12, 0]
    # Each filter is min-max scaled on its own: first tap black, last white, 4x4 blocks.
    assert cell[0, 0] == 0 and cell[-1, -1] == 255
    np.testing.assert_array_equal(cell[:4, :4], 0)
    assert cell[0, 4] == round(255 / 8)
    # The unused sixth cell and the borders stay white.
    assert (grid[2 * 13 + 1:, 13 + 1:] == 255).all() and (grid[0] == 255).all()


def test_nearest_neighbours_by_hand_and_brute_force():
    features = np.array([[1, 0], [0.9, 0.1], [0, 1], [2, 0]], dtype=np.float32)
    # Cosine: row 3 is parallel to row 0 (1.0), then row 1, then row 2 (0.0).
    order, similarity = nearest_neighbours(features, [0], 3)
    np.testing.assert_array_equal(order, [[3, 1, 2]])
    np.testing.assert_allclose(similarity, [[1.0, 0.9 / np.hypot(0.9, 0.1), 0.0]], atol=1e-7)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 6))
    queries = [0, 7, 29]
    got, _ = nearest_neighbours(x, queries, 4)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for row, q in zip(got, queries, strict=True):
        others = [(-(unit[q] @ unit[j]), j) for j in range(30) if j != q]
        assert list(row) == [j for _, j in sorted(others)[:4]]
    with pytest.raises(InvalidInput, match=r"k must be in \[1, 29\]"):
        nearest_neighbours(x, [0], 30)


def test_digits_and_files_carry_their_labels(tmp_path):
    image, label = image_and_label("digits:test/0", 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert label == str(digits.split_arrays("test")[1][0])
    (tmp_path / "cat").mkdir()
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(tmp_path / "cat" / "a.png")
    image, label = image_and_label(str(tmp_path / "cat" / "a.png"), 8)
    assert image.shape == (8, 8, 3) and label == "cat"


def _write_summaries(model_dir):
    for sub, tags in (("train", {"loss": lambda s: 1.0 / (s + 1), "lr": lambda s: 0.1}),
                      ("eval", {"accuracy": lambda s: s / 10})):
        writer = tf.summary.create_file_writer(os.path.join(model_dir, sub))
        with writer.as_default():
            for step in range(5):
                for tag, value in tags.items():
                    tf.summary.scalar(tag, value(step), step=step)
        writer.close()


def test_read_scalars_and_curves_png(tmp_path):
    _write_summaries(str(tmp_path / "run"))
    scalars = read_scalars(str(tmp_path / "run"))
    assert sorted(scalars) == ["eval/accuracy", "train/loss", "train/lr"]
    steps, values = scalars["train/loss"]
    np.testing.assert_array_equal(steps, np.arange(5))
    np.testing.assert_allclose(values, 1.0 / (np.arange(5) + 1), rtol=1e-6)
    output = tmp_path / "curves.png"
    assert figures.plot_curves(scalars, str(output), width=600, height=300) == ["train/lr"]
    with Image.open(output) as image:
        assert image.format == "PNG" and image.size == (600, 300)
    with pytest.raises(InvalidInput, match="no scalar summary that changes"):
        figures.plot_curves({"lr": (np.arange(3), np.ones(3))}, str(tmp_path / "none.png"))


@pytest.mark.slow
def test_binaries_write_readable_pngs(tmp_path):
    # Features of embedded digits, with an index of their names.
    rng = np.random.default_rng(2)
    np.save(tmp_path / "embedding.npy", rng.normal(size=(12, 5)).astype(np.float32))
    (tmp_path / "index.txt").write_text("".join(f"digits:test/{i}\n" for i in range(12)))
    _write_summaries(str(tmp_path / "run"))
    commands = {
        "filters": ["filters", "--model=nin_mnist", "--init=random"],
        "retrieval": ["retrieval", f"--features={tmp_path / 'embedding.npy'}", "--queries=3",
                      "--k=4"],
        "curves": ["curves", f"--pretrained={tmp_path / 'run'}", "--width=400", "--height=300"],
    }
    running = {  # all at once: each spends most of its time importing TensorFlow
        name: subprocess.Popen(
            [sys.executable, "-m", "evaluation.visualize", *args,
             f"--output={tmp_path / (name + '.png')}"],
            cwd=ROOT, env=test_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, args in commands.items()}
    for name, process in running.items():
        _, error = process.communicate(timeout=300)
        assert process.returncode == 0 and error == "", (name, error[-2000:])
    sizes = {}
    for name in commands:
        with Image.open(tmp_path / f"{name}.png") as image:
            image.verify()
        with Image.open(tmp_path / f"{name}.png") as image:
            sizes[name] = image.size
    assert sizes["filters"][0] >= 800 and sizes["curves"] == (400, 300)
    assert sizes["retrieval"][0] >= 400 and sizes["retrieval"][1] >= 300
    config = VisualizeConfig(figure="retrieval", features=str(tmp_path / "embedding.npy"),
                             queries=4, k=12, output=str(tmp_path / "x.png"))
    with pytest.raises(InvalidInput, match=r"k must be in \[1, 11\]"):
        _retrieval(config)
