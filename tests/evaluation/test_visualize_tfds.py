"""Retrieval (NAT Figure 3) of an index of tfds rows: the images and class names read from a
split that tfds.testing.mock_data serves, each split read once; the red frames."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from data import DataError, prepared
from evaluation import figures
from evaluation.visualize import VisualizeConfig
from evaluation.visualize_lib import _retrieval, load_images, tfds_key
from runtime.errors import InvalidInput
from tests.helpers import run_module

SIZES = {"train": 40, "test": 12}
FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")


def source_image(split: str, i: int) -> np.ndarray:
    """The 28x28x1 uint8 image at position i of a split: every pixel differs."""
    offset = 100 if split == "train" else 0
    return ((np.arange(28 * 28).reshape(28, 28, 1) * 3 + 7 * i + offset) % 256).astype(np.uint8)


def source_label(split: str, i: int) -> int:
    return (i + (3 if split == "train" else 0)) % 10


class FakeSplits:
    """An as_dataset_fn for mock_data: the images above, PNG-encoded when the image decoding
    is skipped (as tfds does); records each read and how far each split was read."""

    def __init__(self):
        self.reads, self.generated = [], {}

    def __call__(self, split, decoders=None, read_config=None, shuffle_files=False):
        # an instance is not bound to the builder as a method: no `self` of the builder
        del read_config, shuffle_files
        self.reads.append(split)
        encoded = bool(decoders) and "image" in decoders

        def examples():
            for i in range(SIZES[split]):
                self.generated[split] = i
                image = source_image(split, i)
                yield {"image": tf.io.encode_png(image).numpy() if encoded else image,
                       "label": np.int64(source_label(split, i))}

        image_spec = (tf.TensorSpec((), tf.string) if encoded
                      else tf.TensorSpec((28, 28, 1), tf.uint8))
        return tf.data.Dataset.from_generator(examples, output_signature={
            "image": image_spec, "label": tf.TensorSpec((), tf.int64)})


def test_tfds_rows_draw_their_pixels_and_class_names(tmp_path):
    fake = FakeSplits()
    names = {0: "tfds:fashion_mnist/test/7", 1: "tfds:fashion_mnist/train/2",
             2: "tfds:fashion_mnist/test/3", 5: "tfds:fashion_mnist/test/7",
             6: "digits:test/0"}
    with tfds.testing.mock_data(as_dataset_fn=fake, data_dir=str(tmp_path)):
        loaded = load_images(names, 56, data_dir=str(tmp_path))
        digits_names = load_images({0: "tfds:mnist/test/4"}, 28, data_dir=str(tmp_path))
    # each split read once, and not to its end (tfds prefetches a little past position 2)
    assert sorted(fake.reads) == ["test", "test", "train"]  # fashion_mnist's and mnist's test
    assert fake.generated["train"] < SIZES["train"] - 1
    assert sorted(loaded) == [0, 1, 2, 5, 6]
    for row, split, i in ((0, "test", 7), (1, "train", 2), (2, "test", 3), (5, "test", 7)):
        image, label = loaded[row]
        # 56 = 2 x 28: nearest-neighbour doubling, grey in all three channels
        want = np.repeat(np.repeat(source_image(split, i), 2, axis=0), 2, axis=1)
        np.testing.assert_array_equal(image, np.repeat(want, 3, axis=-1))
        assert label == FASHION[source_label(split, i)]
    assert [loaded[r][1] for r in (0, 1, 2)] == ["Sneaker", "Sandal", "Dress"]
    assert loaded[6][1] is not None  # digits rows still carry their class
    image, label = digits_names[0]  # mnist's info names its classes "0".."9"
    np.testing.assert_array_equal(image[..., 1], source_image("test", 4)[..., 0])
    assert label == "4"


def test_examples_at_reads_one_pass_and_names_what_is_wrong(tmp_path):
    fake = FakeSplits()
    with tfds.testing.mock_data(as_dataset_fn=fake, data_dir=str(tmp_path)):
        read = prepared.examples_at("fashion_mnist", "test", [9, 1, 9], str(tmp_path))
        assert fake.reads == ["test"]
        assert sorted(read.images) == [1, 9] and read.labels == {1: 1, 9: 9}
        assert read.names == FASHION
        np.testing.assert_array_equal(read.images[9], source_image("test", 9))
        with pytest.raises(DataError, match=r"fashion_mnist split 'test' ends before position "
                                            r"12$"):
            prepared.examples_at("fashion_mnist", "test", [3, 12], str(tmp_path))
    with pytest.raises(DataError, match="tfds has no dataset 'no_such_set'"):
        prepared.examples_at("no_such_set", "test", [0], str(tmp_path))
    with pytest.raises(DataError, match=r"dataset mnist is not prepared in .*`tfds build mnist "
                                        r"--data_dir="):
        prepared.examples_at("mnist", "test", [0], str(tmp_path))
    assert tfds_key("tfds:cifar10_corrupted/brightness_1/test/42") == (
        "cifar10_corrupted/brightness_1", "test", 42)
    for bad in ("tfds:mnist/7", "tfds:mnist/test/x", "tfds:/test/1"):
        with pytest.raises(InvalidInput, match="is not tfds:<name>/<split>/<position>"):
            tfds_key(bad)


def _index(tmp_path, features, names):
    np.save(tmp_path / "embedding.npy", np.asarray(features, np.float32))
    (tmp_path / "index.txt").write_text("".join(f"{n}\n" for n in names))
    return str(tmp_path / "embedding.npy")


def test_retrieval_of_tfds_rows_frames_neighbours_of_another_class(tmp_path, monkeypatch):
    # 12 test rows, label i % 10: rows 0 and 10 are T-shirts. Query 0's neighbours by cosine
    # are 10 (same class), 5 (Sandal), 3 (Dress); every other row points elsewhere.
    features = np.zeros((12, 3))
    features[:, 2] = 1.0
    features[0], features[10], features[5], features[3] = [1, 0, 0], [1, .1, 0], [1, .3, 0], \
        [1, .6, 0]
    path = _index(tmp_path, features, [f"tfds:fashion_mnist/test/{i}" for i in range(12)])
    drawn = []
    save = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, out: (drawn.append(fig), save(fig, out)))
    config = VisualizeConfig(figure="retrieval", features=path, query_indices=(0,), k=3,
                             cell=28, data_dir=str(tmp_path), output=str(tmp_path / "r.png"))
    with tfds.testing.mock_data(as_dataset_fn=FakeSplits(), data_dir=str(tmp_path)):
        _retrieval(config)
    assert (tmp_path / "r.png").stat().st_size > 0
    axes = drawn[0].axes
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    want = [("query: T-shirt/top", None)] + [
        (f"{FASHION[j % 10]} · {unit[0] @ unit[j]:.2f}", red) for j, red in
        ((10, False), (5, True), (3, True))]
    for ax, (title, red), row in zip(axes, want, (0, 10, 5, 3), strict=True):
        assert ax.get_title() == title
        np.testing.assert_array_equal(ax.images[0].get_array(),
                                      np.repeat(source_image("test", row), 3, axis=-1))
        if red is not None:
            colours = {tuple(s.get_edgecolor()) for s in ax.spines.values()}
            assert (colours == {(1.0, 0.0, 0.0, 1.0)}) == red, (title, colours)
    assert "2 of 3 neighbours are of another class" in drawn[0].texts[0].get_text()
    assert "(12 images of fashion_mnist/test)" in drawn[0].texts[0].get_text()


def test_retrieval_of_an_unprepared_split_names_the_dataset_and_data_dir(tmp_path):
    path = _index(tmp_path, np.eye(4), [f"tfds:mnist/test/{i}" for i in range(4)])
    config = VisualizeConfig(figure="retrieval", features=path, k=2, queries=2,
                             data_dir=str(tmp_path / "tfds"), output=str(tmp_path / "r.png"))
    with pytest.raises(InvalidInput, match=r"index.txt: dataset mnist is not prepared in .*"
                                           r"`tfds build mnist --data_dir=.*tfds`"):
        _retrieval(config)
    assert not (tmp_path / "r.png").exists()


@pytest.mark.slow
def test_binary_says_in_one_line_that_the_split_is_not_prepared(tmp_path):
    path = _index(tmp_path, np.eye(4), [f"tfds:mnist/test/{i}" for i in range(4)])
    result = run_module("evaluation.visualize", "retrieval", f"--features={path}", "--k=2",
                        f"--data_dir={tmp_path / 'tfds'}", f"--output={tmp_path / 'r.png'}")
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluation.visualize: error: "), lines
    assert "dataset mnist is not prepared" in lines[0] and "--data_dir=" in lines[0]
