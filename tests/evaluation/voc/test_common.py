"""The VOC step loop stops on a NaN/Inf loss: one line with the step, the last good checkpoint
kept."""

import os
import types

import numpy as np
import pytest
import tensorflow as tf

from evaluation.voc.common import train_loop
from losses.divergence import NonFiniteLoss
from runtime import cli


def _loop(tmp_path, nan_at: int):
    weight = tf.Variable(0.0)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(w=weight), str(tmp_path), 5)
    config = types.SimpleNamespace(num_steps=8, log_every=100, checkpoint_every=2)

    def step_fn(step):
        weight.assign(float(step))
        return {"loss": tf.constant(np.nan if step == nan_at else 1.0 / step),
                "l2": tf.constant(0.5)}

    return lambda: train_loop(step_fn, iter(range(1, 9)), manager, lambda s: 0.1, 0, config)


def test_a_nan_loss_stops_the_loop_at_its_step_keeping_the_last_good_checkpoint(tmp_path):
    run = _loop(tmp_path, nan_at=5)
    with pytest.raises(NonFiniteLoss) as error:
        run()
    assert str(error.value) == (
        f"training: loss is not finite at step 5 (loss nan); stopped: nothing saved from it on; "
        f"the last good checkpoint is {tmp_path / 'ckpt-4'}")
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".index")) == [
        "ckpt-2.index", "ckpt-4.index"]
    assert tf.train.load_checkpoint(str(tmp_path / "ckpt-4")).get_tensor(
        "w/.ATTRIBUTES/VARIABLE_VALUE") == 4.0


def test_the_binary_prints_one_line_and_exits_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run_or_fail("evaluation.voc.classification", lambda _: _loop(tmp_path, 2)(), None)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "evaluation.voc.classification: error: training: loss is not finite at step 2 (loss "
        "nan); stopped: nothing saved from it on; the last good checkpoint is none")


def test_a_finite_run_saves_every_checkpoint(tmp_path):
    _loop(tmp_path, nan_at=-1)()
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".index")) == [
        f"ckpt-{s}.index" for s in (2, 4, 6, 8)]


def test_a_fresh_run_initialises_from_the_newest_intact_checkpoint_read_once(tmp_path, capsys,
                                                                             monkeypatch):
    import keras

    from evaluation.voc import common
    from evaluation.voc.classification import VocClassificationConfig
    from models import checkpoints
    from models.checkpoints import ChosenCheckpoint
    from models.weights import load_weights, named_variables

    def net():
        inputs = keras.Input((3,))
        return keras.Model(inputs, keras.layers.Dense(2, name="fc")(inputs))

    pretrained, saved = net(), tmp_path / "pretrained"
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=named_variables(pretrained)), str(saved), 5)
    for step in (1, 2):
        pretrained.get_layer("fc").kernel.assign(np.full((3, 2), step, np.float32))
        manager.save(checkpoint_number=step)
    data = saved / "ckpt-2.data-00000-of-00001"
    os.truncate(data, os.path.getsize(data) // 2)
    seen, reads, check = [], [], checkpoints.check_checkpoint
    monkeypatch.setattr(checkpoints, "check_checkpoint",
                        lambda prefix, want=None: reads.append(prefix) or check(prefix, want))

    class Protocol:
        def build(self, config, preprocessing):
            built = net()
            return built, 0.1, built.trainable_variables

        def initialize(self, built, config):
            seen.append(config.pretrained)
            load_weights(built, config.pretrained)
            load_weights(built, config.pretrained)  # (detection fills two parts of its net)

        def prepare(self, built, config, resumed):
            seen.append(resumed)

    config = VocClassificationConfig(model_dir=str(tmp_path / "voc"), pretrained=str(saved))
    built, *_ = common._start(Protocol(), config)
    (chosen, resumed) = seen
    assert reads == [str(saved / "ckpt-2"), str(saved / "ckpt-1")]  # each read once
    assert isinstance(chosen, ChosenCheckpoint) and not resumed
    assert (chosen.prefix, chosen.step) == (str(saved / "ckpt-1"), 1)
    np.testing.assert_array_equal(built.get_layer("fc").kernel.numpy(), np.ones((3, 2)))
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: skipped damaged checkpoint {saved}/ckpt-2 (truncated: ")
    assert line.endswith(f"): using {saved}/ckpt-1 (step 1) instead")
