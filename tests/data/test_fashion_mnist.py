"""Fashion-MNIST from the Debian package dataset-fashion-mnist: the real files, their offline
preparation into a tfds data_dir, the readers and a binary on it, and the one-line errors."""

import contextlib
import gzip
import hashlib
import io
import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data import DataError, fashion_mnist, labelled, prepared
from data.pretrain import open_source
from tests.helpers import run_module

NO_DEBIAN = (f"{fashion_mnist.DEBIAN_DIR} is absent: `apt-get install dataset-fashion-mnist` "
             "(.ci/run installs it where it can)")
needs_debian = pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_DIR), reason=NO_DEBIAN)


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    """A data_dir with fashion_mnist prepared from the Debian files once for this module (the
    preparation takes about a minute): (data_dir, what it printed, seconds)."""
    if not os.path.isdir(fashion_mnist.DEBIAN_DIR):
        pytest.skip(NO_DEBIAN)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    printed = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        prepared.tfds_split("fashion_mnist", "test", data_dir)
    return data_dir, printed.getvalue(), time.perf_counter() - start


def test_every_table_of_datasets_has_fashion_mnist():
    from data import LABELLED_DATASETS, PRETRAIN_DATASETS, is_pretrain_dataset
    from data.pretrain import TFDS_PRETRAIN_SPLIT
    from evaluation import finetune

    assert "fashion_mnist" in PRETRAIN_DATASETS and is_pretrain_dataset("fashion_mnist")
    assert TFDS_PRETRAIN_SPLIT["fashion_mnist"] == "train"
    assert labelled.TFDS_SPLIT["fashion_mnist"] == {"train": "train", "test": "test"}
    assert labelled.LabelledSource("fashion_mnist").num_classes == 10
    for name in LABELLED_DATASETS:  # fine-tuning's protocol knows every labelled dataset
        assert name in finetune.PROTOCOL_LABELS and name in finetune.MIRROR, name


@needs_debian
def test_the_files_hold_the_dataset():
    images, labels = fashion_mnist.arrays("train")
    test_images, test_labels = fashion_mnist.arrays("test")
    assert images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test_labels), [1000] * 10)
    # the first train image (an ankle boot, class 9), pinned
    assert hashlib.sha256(images[0].tobytes()).hexdigest() == (
        "5bd44e331a6d6998daf675700cd0c13dcd7af8ab954b7585124124da61459e7b")
    assert labels[0] == 9 and test_labels[0] == 9
    assert images.max() == 255 and images.min() == 0


def _write_gz(path, content: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(content)


def test_damaged_files_are_named(tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    header = np.array([2049, 10000], ">u4").tobytes()
    _write_gz(tmp_path / name, np.array([2051, 10000], ">u4").tobytes() + bytes(10000))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: IDX header \[2051, 10000\]"
                                        r", expected \[2049, 10000\].*--reinstall"):
        fashion_mnist.read_file(str(tmp_path), name)
    _write_gz(tmp_path / name, header + bytes(9999))
    with pytest.raises(DataError, match="10007 bytes decompressed, expected 10008"):
        fashion_mnist.read_file(str(tmp_path), name)
    _write_gz(tmp_path / name, header + bytes(10000))
    with pytest.raises(DataError, match=r"SHA-256 of the decompressed file is [0-9a-f]{64}, "
                                        r"expected 0402a96d92fd"):
        fashion_mnist.read_file(str(tmp_path), name)
    (tmp_path / name).write_bytes(b"not gzip")
    with pytest.raises(DataError, match="not a readable gzip file"):
        fashion_mnist.read_file(str(tmp_path), name)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: missing"):
        fashion_mnist.read_file(str(tmp_path), "train-images-idx3-ubyte.gz")


def test_without_data_or_package_one_line_names_both_commands(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "no-package"))
    data_dir = str(tmp_path / "tfds")
    expected = (f"dataset fashion_mnist is not prepared in {data_dir} and {tmp_path}/no-package "
                "does not exist: run `apt-get install dataset-fashion-mnist` (it is then "
                "prepared from there, offline) or `tfds build fashion_mnist "
                f"--data_dir={data_dir}`")
    for read in (lambda: labelled.load_labels(labelled.LabelledSource("fashion_mnist",
                                                                      data_dir), "train"),
                 lambda: open_source("fashion_mnist", (28, 28, 1), data_dir=data_dir)):
        with pytest.raises(DataError) as error:
            read()
        assert str(error.value) == expected
    assert not os.path.exists(os.path.join(data_dir, "fashion_mnist", "3.0.1"))


def test_offline_preparation_is_what_tfds_load_reads(prepared_dir):
    data_dir, printed, _ = prepared_dir
    assert printed == (f"preparing fashion_mnist in {data_dir} from {fashion_mnist.DEBIAN_DIR} "
                       "(Debian dataset-fashion-mnist), once\n")
    # what a `tfds build` leaves, and nothing else (no downloads folder)
    assert sorted(os.listdir(data_dir)) == ["fashion_mnist"]
    builder = tfds.builder("fashion_mnist", data_dir=data_dir)
    assert builder.is_prepared()
    assert {s: builder.info.splits[s].num_examples for s in ("train", "test")} == {
        "train": 60000, "test": 10000}
    # the files' examples, in tfds's own order (its writer orders examples by hashed keys)
    test = tfds.load("fashion_mnist", split="test", data_dir=data_dir, download=False,
                     batch_size=-1)
    images, labels = fashion_mnist.arrays("test")
    assert _examples(test["image"].numpy()[..., 0], test["label"].numpy()) == _examples(
        images, labels)
    train = tfds.load("fashion_mnist", split="train", data_dir=data_dir, download=False)
    assert int(train.cardinality()) == 60000


def _examples(images, labels) -> list[tuple[bytes, int]]:
    return sorted(zip((image.tobytes() for image in images), labels.tolist(), strict=True))


def test_the_readers_use_the_prepared_data_without_preparing_again(prepared_dir, capsys):
    data_dir, _, _ = prepared_dir
    source = labelled.LabelledSource("fashion_mnist", data_dir)
    train_labels = labelled.load_labels(source, "train")
    np.testing.assert_array_equal(np.bincount(train_labels), [6000] * 10)
    x, y = labelled.load_arrays(source, "test", (28, 28, 1), indices=np.array([0, 3]))
    test = tfds.load("fashion_mnist", split="test[:4]", data_dir=data_dir, batch_size=-1)
    np.testing.assert_allclose(x, test["image"].numpy()[[0, 3]] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, test["label"].numpy()[[0, 3]])
    stream = open_source("fashion_mnist", (28, 28, 1), data_dir=data_dir)
    assert stream.num_examples == 60000 and stream.fixed_size
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_linear_probe_binary_on_fashion_mnist(prepared_dir, tmp_path):
    data_dir, _, _ = prepared_dir
    out = tmp_path / "out"
    run = run_module("evaluation.linear_probe", "--model=nin_mnist", "--init=random",
                     "--dataset=fashion_mnist", f"--data_dir={data_dir}", "--endpoints=pixels",
                     "--labels_per_class=3", "--splits=1", "--max_test_examples=50",
                     f"--output_dir={out}", timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "on fashion_mnist: 30 train images drawn, 50 test images" in run.stdout
    assert "preparing" not in run.stdout
