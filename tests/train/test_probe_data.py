"""The labelled data of a pretraining run's probes, final table and fine-tuning: checked before
training, read from the run's --data_dir, one line naming `tfds build` when it is not there."""

import os
import re
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from data import DataError, labelled
from evaluation import finetune, finetune_lib
from evaluation.linear_probe import ProbeConfig
from evaluation.linear_probe_lib import run as linear_probe
from train import pretrain_lib
from train.config import TrainConfig


def prepare_tiny_mnist(data_dir, train_per_class: int = 3, test_per_class: int = 2) -> None:
    """A real tfds `mnist` prepared in `data_dir` by its own builder, from IDX files of
    10 * train_per_class and 10 * test_per_class images written here (no download)."""
    rng = np.random.default_rng(0)
    files = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        images = (rng.random((len(labels), 28, 28)) * 64).astype(np.uint8)
        for c in range(10):  # a bright bar whose place is the class
            images[labels == c, 2 * c:2 * c + 6, 4:10] = 255
        os.makedirs(os.path.join(data_dir, "raw"), exist_ok=True)
        for part, header, values in (("data", 16, images), ("labels", 8, labels)):
            files[f"{split}_{part}"] = os.path.join(data_dir, "raw", f"{split}-{part}")
            with open(files[f"{split}_{part}"], "wb") as f:
                f.write(b"\0" * header + values.tobytes())
    with mock.patch.object(tfds_mnist, "_TRAIN_EXAMPLES", 10 * train_per_class), \
            mock.patch.object(tfds_mnist, "_TEST_EXAMPLES", 10 * test_per_class), \
            mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                              lambda self, urls: {key: files[key] for key in urls}):
        tfds.builder("mnist", data_dir=data_dir).download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))


def _command(data_dir) -> str:
    return re.escape(f"run `tfds build mnist --data_dir={data_dir}`")


def test_unprepared_probe_data_stops_the_run_before_training(tmp_path):
    empty = str(tmp_path / "tfds")
    config = TrainConfig(model_dir=str(tmp_path / "run"), dataset="digits", probe_dataset="mnist",
                         data_dir=empty, epochs=1, export_dir="none")
    with pytest.raises(DataError, match=_command(empty)):
        pretrain_lib.run(config)
    assert not os.path.exists(config.model_dir)  # nothing trained, nothing written
    # Without a probe or a final table, nothing needs the labels.
    pretrain_lib.check_probe_data(TrainConfig(model_dir=config.model_dir, dataset="digits",
                                          probe_dataset="mnist", data_dir=empty,
                                          probe_every_epochs=0, final_eval="none"))


def test_fine_tuning_and_probes_check_both_splits_first(tmp_path):
    empty = str(tmp_path / "tfds")
    for split in ("train", "test"):
        with pytest.raises(DataError, match=_command(empty)):
            labelled.check_available(labelled.LabelledSource("mnist", empty), (split,))
    with pytest.raises(DataError, match=_command(empty)):  # a read, too, is one line
        labelled.load_labels(labelled.LabelledSource("mnist", empty), "train")
    with pytest.raises(DataError, match=_command(empty)):
        finetune_lib.run(finetune.FinetuneConfig(init="random", model="nin_mnist", dataset="mnist",
                                             data_dir=empty, output_dir=str(tmp_path / "ft")))
    with pytest.raises(DataError, match=_command(empty)):
        linear_probe(ProbeConfig(model="nin_mnist", init="random", dataset="mnist",
                                 data_dir=empty, output_dir=str(tmp_path / "probe")))
    assert not os.path.exists(tmp_path / "ft") and not os.path.exists(tmp_path / "probe")
    labelled.check_available("digits")  # embedded: always there


@pytest.mark.slow
def test_probes_and_final_table_read_the_runs_data_dir(tmp_path):
    data_dir = str(tmp_path / "tfds")
    prepare_tiny_mnist(data_dir)
    reads = []
    real = labelled._tfds_dataset

    def spy(source, split, skip_image):
        reads.append((source.name, source.data_dir, split))
        return real(source, split, skip_image)

    config = TrainConfig(model_dir=str(tmp_path / "run"), dataset="mnist", data_dir=data_dir,
                         epochs=1, batch_size=10, nat_dim=8, steps_per_loop=1,
                         export_dir="none", probe_every_epochs=1, probe_labels_per_class=2,
                         probe_splits=2, crop="pad")
    with mock.patch.object(labelled, "_tfds_dataset", spy):
        summary = pretrain_lib.run(config)
    assert [epochs for epochs, _, _ in summary["probe_history"]] == [1]
    assert summary["final"]["probe"]["dataset"] == "mnist"
    # Every labelled read went to the run's data_dir, both splits (the final table included).
    assert {(name, where) for name, where, _ in reads} == {("mnist", data_dir)}
    assert {split for _, _, split in reads} == {"train", "test"}
