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
