"""VOC 2007 detection transfer (Fast R-CNN): the binary end to end and its errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags

from evaluation.voc import detection as vd
from evaluation.voc import detection_lib as vd_lib
from evaluation.voc.fast_rcnn import proposals as det_proposals
from runtime import cli
from tests.helpers import (
    SQUARE,
    as_dataset_fn,
    jittered_proposals,
    make_example,
    make_run_dir,
    run_module,
    shape_image,
)

NAMES = {SQUARE: "cat", 3 - SQUARE: "dog"}


def make_splits(seed: int = 0):
    """4 trainval and 2 test tfds-style examples of shapes, and jittered proposals."""
    rng = np.random.default_rng(seed)
    splits, proposals = {"train+validation": [], "test": []}, {}
    for i in range(6):
        image, boxes, labels = shape_image(rng, (96, 120))
        objects = [(NAMES[int(k)], tuple(int(v) for v in b), False)
                   for b, k in zip(boxes, labels, strict=True)]
        if i == 1:  # a difficult object: left out of training, ignored by the metric
            objects.append(("cat", (1, 1, 20, 20), True))
        split = "train+validation" if i < 4 else "test"
        image_id = f"{i:06d}"
        splits[split].append(make_example(f"{image_id}.jpg", image, objects))
        proposals[image_id] = jittered_proposals(rng, boxes, 96, 120, per_box=10, background=30)
    return splits, proposals


def save_pretraining(directory) -> str:
    return make_run_dir(directory, "alexnet", config={"method": "nat", "dataset": "test"},
                        input_shape=(67, 67, 3), preprocessing="rgb", head="nat",
                        feature_dim=8)[0]


def small_config(model_dir, **kwargs) -> vd.VocDetectionConfig:
    """Tiny settings: 96-pixel images, 16 RoIs, fc6/fc7 of 32 units, 3 steps."""
    settings = dict(scales=(96,), max_size=200, test_scale=96, rois_per_image=16, num_steps=3,
                    checkpoint_every=2, log_every=1, max_proposals=100, num_visualize=2,
                    shuffle_buffer=8, fc_units=32)
    return vd.VocDetectionConfig(model_dir=str(model_dir), **{**settings, **kwargs})


def test_defaults_are_the_fast_rcnn_protocol():
    c = vd.VocDetectionConfig(model_dir="x")
    assert (c.images_per_batch, c.rois_per_image, c.fg_fraction) == (2, 128, 0.25)
    assert (c.fg_threshold, c.bg_low, c.bg_high) == (0.5, 0.1, 0.5)
    assert (c.scales, c.max_size, c.test_scale, c.flip) == ((600,), 1000, 600, True)
    assert (c.momentum, c.weight_decay, c.learning_rate, c.lr_decay) == (0.9, 5e-4, 1e-3, 0.1)
    assert (c.nms_threshold, c.max_per_image, c.search_mode, c.freeze_through) == (
        0.3, 100, "fast", "none")
    schedule = vd_lib.learning_rate_schedule(dataclasses.replace(c, lr_steps=(30000, 35000)))
    # Iteration t (1-based) runs at schedule(t - 1): iterations 1..30000 at 1e-3.
    lrs = [float(schedule(t - 1)) for t in (1, 30000, 30001, 35000, 35001)]
    np.testing.assert_allclose(lrs, [1e-3, 1e-3, 1e-4, 1e-4, 1e-5], rtol=1e-6)
    constant = vd_lib.learning_rate_schedule(dataclasses.replace(c, lr_steps=()))
    assert float(constant(0)) == float(constant(10 ** 6)) == pytest.approx(1e-3)


def test_flags_parse_into_the_config(tmp_path):
    values = flags.FlagValues()
    cli.define_flags(vd.VocDetectionConfig, values, vd.PROGRAM)
    values(["prog", f"--model_dir={tmp_path}", "--scales=480,576,688", "--lr_steps=10,20",
            "--freeze_through=conv1", "--noflip"])
    config = cli.config_from_flags(vd.VocDetectionConfig, values)
    assert config.scales == (480, 576, 688) and config.lr_steps == (10, 20)
    assert config.freeze_through == "conv1" and not config.flip and config.preprocessing == ""
    values["scales"].value = ["480", "big"]
    with pytest.raises(ValueError, match="--scales=480,big: expected a comma-separated list"):
        cli.config_from_flags(vd.VocDetectionConfig, values)
    # --help of the binary lists the run flags the README uses
    help_text = values.module_help(vd.PROGRAM)
    for flag in ("--model_dir", "--pretrained", "--data_dir", "--proposal_workers"):
        assert flag in help_text


def test_config_validation_one_line():
    for bad, pattern in [({"scales": (600, 32)}, "scales=600,32"),
                         ({"bg_low": 0.6}, "bg_low"),
                         ({"freeze_through": "fc6"}, "freeze_through='fc6'"),
                         ({"lr_steps": (20, 10)}, "lr_steps=20,10"),
                         ({"max_size": 500}, "max_size=500"),
                         ({"rois_per_image": 0}, "rois_per_image=0")]:
        with pytest.raises(ValueError, match=pattern) as caught:
            dataclasses.replace(vd.VocDetectionConfig(model_dir="x"), **bad).validate()
        assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_end_to_end_selective_search_then_resume(tmp_path, monkeypatch):
    splits, _ = make_splits()
    init = save_pretraining(tmp_path / "pretrain")
    config = small_config(tmp_path / "det", pretrained=init)
    with tfds.testing.mock_data(as_dataset_fn=as_dataset_fn(splits)):
        results = vd_lib.run(config)
    out = tmp_path / "det"
    # Selective search ran once per image, into the cache.
    assert sorted(p.name for p in (out / "proposals").iterdir()) == [
        f"{i:06d}.npy" for i in range(6)]
    assert results["step"] == 3 and results["num_images"] == 2
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["per_class"]) == set(vd_lib.voc_data.VOC_CLASSES)
    assert saved["per_class"]["bird"] is None  # no bird in the test images
    present = [saved["per_class"][c] for c in ("cat", "dog")]
    assert all(0 <= ap <= 1 for ap in present)
    assert saved["map"] == pytest.approx(np.mean(present))
    assert "| **mean** |" in (out / "results.md").read_text()
    assert (out / "detections.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((out / "config.json").read_text())
    assert written["scales"] == [96] and written["model_kwargs"]["preprocessing"] == "rgb"
    assert tf.train.latest_checkpoint(str(out)).endswith("ckpt-3")
    # It trained: the classifier moved between the checkpoints of steps 2 and 3.
    moved = [tf.train.load_checkpoint(str(out / f"ckpt-{s}")).get_tensor(
        "model/cls_score..kernel/.ATTRIBUTES/VARIABLE_VALUE") for s in (2, 3)]
    assert np.abs(moved[1] - moved[0]).max() > 1e-6

    # A second run resumes at step 3 and reads the cached proposals.
    def no_search(*args, **kwargs):
        raise AssertionError("selective search ran again")

    monkeypatch.setattr(det_proposals, "selective_search", no_search)
    with tfds.testing.mock_data(as_dataset_fn=as_dataset_fn(splits)):
        again = vd_lib.run(dataclasses.replace(config, num_steps=5))
    assert again["step"] == 5 and tf.train.latest_checkpoint(str(out)).endswith("ckpt-5")


@pytest.mark.slow
def test_end_to_end_with_a_proposal_file(tmp_path):
    splits, proposals = make_splits(seed=1)
    np.savez(tmp_path / "proposals.npz", **proposals)
    config = small_config(tmp_path / "det", proposals=str(tmp_path / "proposals.npz"),
                          preprocessing="sobel", num_steps=2, freeze_through="conv3",
                          num_test_images=1)
    with tfds.testing.mock_data(as_dataset_fn=as_dataset_fn(splits)):
        results = vd_lib.run(config)
    assert results["num_images"] == 1 and results["step"] == 2
    assert not (tmp_path / "det" / "proposals").exists()


def exit_message(config, capsys, splits=None) -> str:
    capsys.readouterr()  # what earlier steps of the test printed
    with pytest.raises(SystemExit) as caught:
        if splits is None:
            cli.run_or_fail(vd.PROGRAM, "evaluation.voc.detection_lib:run", config)
        else:
            with tfds.testing.mock_data(as_dataset_fn=as_dataset_fn(splits)):
                cli.run_or_fail(vd.PROGRAM, "evaluation.voc.detection_lib:run", config)
    assert caught.value.code == 1
    message = capsys.readouterr().err
    assert message.startswith("evaluation.voc.detection: error: ")
    assert message.count("\n") == 1
    return message


def test_bad_proposals_exit_with_one_line(tmp_path, capsys):
    splits, proposals = make_splits()
    # A proposal file that does not exist: how to make one.
    message = exit_message(small_config(tmp_path / "a", proposals=str(tmp_path / "no.npz")),
                           capsys)
    assert "no.npz does not exist" in message and "--only_proposals" in message
    # An empty cache that may not be filled.
    message = exit_message(small_config(tmp_path / "b", compute_proposals=False), capsys,
                           splits)
    assert "no proposals for image 000000" in message and "--only_proposals" in message
    # A test image without any proposal.
    proposals["000005"] = np.zeros((0, 4), np.int32)
    np.savez(tmp_path / "p.npz", **proposals)
    message = exit_message(small_config(tmp_path / "c", proposals=str(tmp_path / "p.npz")),
                           capsys, splits)
    assert "image 000005 has no proposal in" in message


@pytest.mark.slow
def test_missing_voc_data_exits_with_one_line(tmp_path):
    process = run_module("evaluation.voc.detection", f"--model_dir={tmp_path / 'm'}",
                         f"--data_dir={tmp_path / 'tfds'}", "--fc_units=16", timeout=300)
    assert process.returncode == 1
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1, process.stderr[-2000:]
    assert lines[0].startswith(
        "evaluation.voc.detection: error: PASCAL VOC 2007 (voc/2007) is not prepared")
    assert f"tfds build voc/2007 --data_dir={tmp_path / 'tfds'}" in lines[0]


def test_only_proposals_fills_the_cache(tmp_path, capsys):
    splits, _ = make_splits(seed=2)
    cache = tmp_path / "cache"
    config = small_config(tmp_path / "m", only_proposals=True, proposal_cache=str(cache))
    with tfds.testing.mock_data(as_dataset_fn=as_dataset_fn(splits)):
        assert vd_lib.run(config) == {"proposal_cache": str(cache)}
    assert sorted(p.name for p in cache.iterdir()) == [f"{i:06d}.npy" for i in range(6)]
    assert not (tmp_path / "m").exists()  # nothing trained, nothing written there
    np.savez(tmp_path / "p.npz", x=np.ones((1, 4)))
    message = exit_message(dataclasses.replace(config, proposals=str(tmp_path / "p.npz")),
                           capsys)
    assert "only_proposals" in message
