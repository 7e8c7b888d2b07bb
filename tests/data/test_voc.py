"""voc/2007 through tfds.testing.mock_data: splits, devkit labels and boxes."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from data import voc as voc_data
from tests.helpers import CLS, as_dataset_fn, make_example

# VOC 2007 test image 000001 (353 x 500): a dog and a person, to which this example adds a
# difficult-only chair and a cat seen twice (difficult once, clean once).
HAND_OBJECTS = [
    ("dog", (48, 240, 195, 371), False),
    ("person", (8, 12, 352, 498), False),
    ("chair", (100, 100, 150, 200), True),
    ("cat", (1, 1, 353, 500), True),
    ("cat", (20, 30, 40, 50), False),
]


def _hand_example() -> dict:
    image = np.zeros((500, 353, 3), np.uint8)
    return make_example("000001.jpg", image, HAND_OBJECTS)


def test_label_conversion_pinned():
    example = _hand_example()
    labels = voc_data.classification_labels(example["labels"], example["labels_no_difficult"])
    expected = np.full(20, -1)
    expected[[CLS["cat"], CLS["dog"], CLS["person"]]] = 1
    expected[CLS["chair"]] = 0  # only a difficult chair: ignored by the metric
    np.testing.assert_array_equal(labels, expected)
    in_graph = voc_data.tf_classification_labels(tf.constant(example["labels"]),
                                                 tf.constant(example["labels_no_difficult"]))
    np.testing.assert_array_equal(in_graph.numpy(), expected)
    # An image with no object at all: -1 everywhere.
    empty = voc_data.tf_classification_labels(tf.zeros([0], tf.int64), tf.zeros([0], tf.int64))
    np.testing.assert_array_equal(empty.numpy(), np.full(20, -1))


def test_box_conversion_pinned():
    example = _hand_example()
    boxes = voc_data.devkit_boxes(example["objects"]["bbox"], 500, 353)
    np.testing.assert_array_equal(boxes, [box for _, box, _ in HAND_OBJECTS])
    assert boxes.dtype == np.int64
    # The float32 round trip is exact for every corner of a VOC-sized image.
    for size in (1, 2, 333, 353, 500):
        corners = np.arange(1, size + 1)
        stored = (corners / size).astype(np.float32)
        back = voc_data.devkit_boxes(np.stack([stored] * 4, axis=1), size, size)
        np.testing.assert_array_equal(back[:, 0], corners)


def test_splits_and_ground_truth_through_mock_data():
    rng = np.random.default_rng(0)
    train = [make_example(f"{i:06d}.jpg", rng.integers(0, 255, (40, 60, 3)),
                          [("bird", (1, 1, 10, 10), False)]) for i in range(3)]
    test = [_hand_example(),
            make_example("000002.jpg", np.zeros((20, 30, 3)), [])]
    requested: list[str] = []
    splits = {"train+validation": train, "test": test}
    with tfds.testing.mock_data(as_dataset_fn=as_dataset_fn(splits, requested)):
        trainval = list(voc_data.load_classification("trainval", data_dir="/nonexistent")
                        .as_numpy_iterator())
        tests = list(voc_data.load_classification("test").as_numpy_iterator())
        raw = list(tfds.as_numpy(voc_data.load_split("test")))
    assert requested == ["train+validation", "test", "test"]
    assert [e["image_id"] for e in trainval] == [b"000000", b"000001", b"000002"]
    assert all(e["labels"][CLS["bird"]] == 1 and e["labels"].sum() == 1 - 19 for e in trainval)
    np.testing.assert_array_equal(trainval[1]["image"], train[1]["image"])
    assert tests[0]["image_id"] == b"000001" and tests[0]["image"].shape == (500, 353, 3)
    assert tests[0]["labels"][CLS["chair"]] == 0 and tests[1]["labels"].tolist() == [-1] * 20

    truth = voc_data.detection_ground_truth(raw)
    assert set(truth) == set(voc_data.VOC_CLASSES)
    assert all(set(per_image) == {"000001", "000002"} for per_image in truth.values())
    cat_boxes, cat_difficult = truth["cat"]["000001"]
    np.testing.assert_array_equal(cat_boxes, [[1, 1, 353, 500], [20, 30, 40, 50]])
    np.testing.assert_array_equal(cat_difficult, [True, False])
    np.testing.assert_array_equal(truth["dog"]["000001"][0], [[48, 240, 195, 371]])
    assert truth["dog"]["000002"][0].shape == (0, 4)


def test_missing_data_names_the_tfds_command(tmp_path):
    with pytest.raises(voc_data.VocDataNotFoundError) as caught:
        voc_data.load_split("test", data_dir=str(tmp_path))
    message = str(caught.value)
    assert f"tfds build voc/2007 --data_dir={tmp_path}" in message
    assert "\n" not in message
    with pytest.raises(ValueError, match="unknown VOC split 'val'"):
        voc_data.load_split("val")


def test_protocol_constants():
    assert voc_data.SPLITS == {"trainval": "train+validation", "test": "test"}
    assert voc_data.NUM_IMAGES == {"trainval": 5011, "test": 4952}
    builder_names = tfds.builder_cls("voc").BUILDER_CONFIGS[0]
    assert builder_names.name == "2007"
    with tfds.testing.mock_data(as_dataset_fn=as_dataset_fn({"test": []})):
        names = tfds.builder("voc/2007").info.features["labels"].feature.names
    assert tuple(names) == voc_data.VOC_CLASSES


def test_download_without_a_network_fails_at_once_and_writes_nothing(tmp_path):
    import time

    tic = time.time()
    with pytest.raises(voc_data.VocDataNotFoundError, match=r"cannot download voc/2007: "
                                                            r"no-such-host.invalid is unreachable"):
        voc_data.check_reachable("no-such-host.invalid", "voc/2007", str(tmp_path), timeout=2.0)
    assert time.time() - tic < 10
    assert list(tmp_path.iterdir()) == []
