"""The training loop on one device: schedules, checkpoints, exact resume, the NaN guard."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.python.framework import config as tf_config

from data import DataError
from data.pretrain import open_source
from losses.divergence import NonFiniteLoss
from runtime.cli import UsageError
from runtime.ownership import RunMismatch
from tests.helpers import (
    checkpoint_tensors,
    folder_contents,
    is_permutation,
    make_run_dir,
    scalars,
    two_replica_strategy,
)
from train.config import TrainConfig
from train.schedule import LearningRate, Plateau
from train.trainer import Trainer


def _config(tmp_path, name="run", **kwargs) -> TrainConfig:
    defaults = dict(model_dir=str(tmp_path / name), batch_size=128, epochs=1, nat_dim=16,
                    steps_per_loop=9, checkpoint_every=1000, lr=0.05)
    defaults.update(kwargs)
    return TrainConfig(**defaults)


def _train(config: TrainConfig) -> Trainer:
    trainer = Trainer(config, tf.distribute.get_strategy(), log=lambda _: None)
    trainer.train()
    return trainer


def test_learning_rate_is_constant_for_t0_steps_then_inverse_decay():
    scale = tf.Variable(1.0)
    schedule = LearningRate(0.5, t0=10, gamma=0.1, scale=scale)
    assert float(schedule(0)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(0.5)
    assert float(schedule(20)) == pytest.approx(0.5 / (1 + 0.1 * 10))
    scale.assign(0.1)
    assert float(schedule(20)) == pytest.approx(0.05 / 2)


def test_nat_run_reassigns_on_schedule_and_checkpoints_everything(tmp_path):
    # digits: 1198 images, batch 128 -> 9 steps per epoch; one loop per epoch.
    config = _config(tmp_path, epochs=3, nat_reassign_every=2)
    trainer = _train(config)
    assert trainer.step == 27 and int(trainer.epoch.numpy()) == 3
    assert is_permutation(trainer.nat.assignment.numpy())
    summaries = scalars(config.model_dir)
    assert {"loss", "lr", "images_per_sec", "nat/reassigned_fraction"} <= set(summaries)
    reassigned = summaries["nat/reassigned_fraction"]
    assert len(reassigned) == 3
    assert reassigned[0] > 0.5 and reassigned[1] == 0.0 and reassigned[2] > 0.0  # epochs 0, 2
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(config.model_dir))
    keys = reader.get_variable_to_shape_map()
    saved = reader.get_tensor("nat/assignment/.ATTRIBUTES/VARIABLE_VALUE")
    np.testing.assert_array_equal(saved, trainer.nat.assignment.numpy())
    assert any(k.startswith("optimizer/") for k in keys)
    assert reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE") == 3


@pytest.mark.parametrize("method", ["nat", "sc"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, method):
    kwargs = dict(method=method, nat_reassign_every=1, sc_patch="5x5", batch_size=256,
                  steps_per_loop=2, checkpoint_every=2)
    straight = _train(_config(tmp_path, "straight", epochs=2, **kwargs))
    _train(_config(tmp_path, "split", epochs=1, **kwargs))
    resumed = _train(_config(tmp_path, "split", epochs=2, **kwargs))
    assert resumed.step == straight.step == 8
    assert resumed.restored_from.startswith("resumed")
    for a, b in zip(straight.model.variables, resumed.model.variables, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                                   err_msg=a.path)
    if method == "nat":
        np.testing.assert_array_equal(straight.nat.assignment.numpy(),
                                      resumed.nat.assignment.numpy())
    for a, b in zip(straight.optimizer.variables, resumed.optimizer.variables, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = _config(tmp_path, epochs=2, steps_per_loop=5, checkpoint_every=5,
                     inject_nan_at_step=12)
    trainer = Trainer(config, tf.distribute.get_strategy(), log=lambda _: None)
    # Checkpoints at step 5 and at the end of epoch 1 (step 9); the loop 9..14 hits step 12.
    with pytest.raises(NonFiniteLoss, match=r"not finite at step 12 .*ckpt-9$"):
        trainer.train()
    latest = tf.train.latest_checkpoint(config.model_dir)
    assert latest.endswith("ckpt-9")
    reader = tf.train.load_checkpoint(latest)
    for name in reader.get_variable_to_shape_map():
        if not name.startswith(("model/", "optimizer/")):
            continue
        value = reader.get_tensor(name)
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            assert np.all(np.isfinite(value)), name


def test_plateau_cuts_the_learning_rate_on_the_mean_of_every_step_of_the_epoch():
    plateau = Plateau(patience=2, factor=0.1, min_delta=1e-3)
    cuts = []
    for losses in ([1.2, 0.8], [0.8], [0.7, 0.899], [0.8001, 0.7989, 0.7999]):
        for loss in losses:
            plateau.add(tf.constant(loss, tf.float32))
        mean, cut = plateau.end_epoch()
        assert mean == pytest.approx(np.mean(np.float32(losses), dtype=np.float64), rel=1e-15)
        assert int(plateau.epoch_steps.numpy()) == 0 and float(plateau.epoch_loss.numpy()) == 0
        cuts.append(cut)
    # Means 1.0, 0.8, 0.7995, 0.7996: the last two are not 1e-3 below the best (0.8), so two
    # bad epochs -> one cut, at the fourth.
    assert cuts == [False, False, False, True]
    assert float(plateau.scale.numpy()) == pytest.approx(0.1)
    assert float(plateau.best_loss.numpy()) == np.float32(0.8)
    assert int(plateau.bad_epochs.numpy()) == 0


# The first 256 digits: 4 steps of 64 per epoch.
def _digits_subset(n: int = 256):
    full = open_source("digits", (28, 28, 1))
    return dataclasses.replace(full, num_examples=n, elements=lambda: full.elements().take(n))


def test_a_run_stopped_mid_epoch_resumes_the_plateau_rule_exactly(tmp_path):
    """SC on 256 digits, 4 steps per epoch, patience 1, min_delta 0.6: here the mean loss of
    epoch 1 is 3.17, of epoch 2 2.68 (a fall of 0.50: a plateau, the rate is cut) while its
    last two steps average 2.47 (a fall of 0.70). The run stops at step 6, in the middle of
    epoch 2, and resumes from its checkpoint of step 6: it must judge epoch 2 on all four of
    its steps, cut the rate there as the uninterrupted run does, and end bitwise equal."""
    source = _digits_subset()
    kwargs = dict(method="sc", sc_patch="5x5", batch_size=64, epochs=3, crop="pad",
                  plateau_patience=1, plateau_min_delta=0.6, plateau_factor=0.1,
                  steps_per_loop=2, checkpoint_every=2, keep_checkpoints=20)

    def train(name, **more):
        trainer = Trainer(_config(tmp_path, name, **kwargs, **more),
                          tf.distribute.get_strategy(), source=source, log=lambda _: None)
        trainer.train()
        return trainer

    train("straight")
    with pytest.raises(NonFiniteLoss, match=r"at step 6 .*ckpt-6$"):  # the stop
        train("stopped", inject_nan_at_step=6)
    resumed = train("stopped")
    assert resumed.restored_from.endswith("at step 6") and resumed.step == 12
    scales = {}
    for name in ("straight", "stopped"):
        tensors = [checkpoint_tensors(tmp_path / name / f"ckpt-{step}") for step in (4, 8, 12)]
        scales[name] = [float(t["lr_scale/.ATTRIBUTES/VARIABLE_VALUE"]) for t in tensors]
    assert scales["straight"] == scales["stopped"] == [1.0, np.float32(0.1), np.float32(0.1)]
    want = checkpoint_tensors(tmp_path / "straight" / "ckpt-12")
    got = checkpoint_tensors(tmp_path / "stopped" / "ckpt-12")
    assert sorted(got) == sorted(want)
    assert {"epoch_loss/.ATTRIBUTES/VARIABLE_VALUE", "epoch_steps/.ATTRIBUTES/VARIABLE_VALUE",
            "best_loss/.ATTRIBUTES/VARIABLE_VALUE"} <= set(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch NAT run: digits, batch 128, 9 steps."""
    config = _config(tmp_path_factory.mktemp("finished"), steps_per_loop=9)
    _train(config)
    return config


def _folder_of(n: int, root) -> str:
    os.makedirs(root)
    for i in range(n):
        Image.fromarray(np.full((8, 8), i % 256, np.uint8)).save(os.path.join(root, f"{i}.png"))
    return f"folder:{root}"


# For each group of the fingerprint, a restart that changes it, and the fields the refusal
# names (a change can move derived facts too).
CHANGES = {
    "method": (dict(method="sc"), ["method", "model_kwargs", "nat_problem"]),
    "model": (dict(nat_dim=8), ["model_kwargs", "nat_dim"]),
    "data": (dict(dataset="folder"), ["dataset", "files", "images"]),
    "batch": (dict(batch_size=64), ["batch_size", "nat_problem"]),
    "seed": (dict(seed=1), ["seed"]),
    "loss": (dict(nat_reassign_every=1), ["nat_reassign_every"]),
    "schedule": (dict(lr=0.01), ["lr"]),
    "augmentation": (dict(flip=True), ["flip"]),
    "init": (dict(pretrained="donor"), ["pretrained"]),
    "evaluation": (dict(probe_splits=2), ["probe_splits"]),
    "distribution": (dict(), ["nat_problem"]),  # two replicas, per-replica NAT problems
    "numerics": (dict(jit_compile=True), ["jit_compile"]),  # XLA rounds differently
}


@pytest.mark.parametrize("group", sorted(CHANGES))
def test_a_restart_that_changes_the_result_is_refused_before_any_write(finished, tmp_path,
                                                                       group):
    assert set(CHANGES) == set(TrainConfig.FINGERPRINT_GROUPS)
    change, named = CHANGES[group]
    change = dict(change)
    if "dataset" in change:
        change["dataset"] = _folder_of(130, str(tmp_path / "images"))
    if "pretrained" in change:
        change["pretrained"], _ = make_run_dir(tmp_path / "donor")
    strategy = two_replica_strategy() if group == "distribution" else tf.distribute.get_strategy()
    before = folder_contents(finished.model_dir)
    config = dataclasses.replace(finished, **change)
    with pytest.raises(RunMismatch) as refused:
        Trainer(config, strategy, log=lambda _: None)
    message = str(refused.value)
    assert message.startswith(f"{finished.model_dir} holds a run with other settings (")
    assert message.endswith("): rerun with the recorded settings, or use another --model_dir")
    listed = message[message.index("(") + 1:message.rindex(")")].split("; ")
    assert [item.split(":")[0] for item in listed] == named
    for name, value in change.items():
        old = json.dumps(getattr(finished, name))
        assert f"{name}: {old} -> {json.dumps(value)}" in listed
    assert folder_contents(finished.model_dir) == before


def test_deterministic_ops_are_enabled_first_and_fingerprinted(finished):
    """--deterministic turns op determinism on before anything is built; a run made without
    it refuses a restart with it, in one line naming the field."""
    before = folder_contents(finished.model_dir)
    try:
        with pytest.raises(RunMismatch) as refused:
            Trainer(dataclasses.replace(finished, deterministic=True),
                    tf.distribute.get_strategy(), log=lambda _: None)
        assert tf_config.is_op_determinism_enabled()
    finally:
        tf_config.disable_op_determinism()
    assert str(refused.value) == (
        f"{finished.model_dir} holds a run with other settings (deterministic: false -> true): "
        "rerun with the recorded settings, or use another --model_dir")
    assert folder_contents(finished.model_dir) == before


def test_a_restart_may_change_the_resumable_settings(finished):
    before = folder_contents(finished.model_dir)
    trainer = Trainer(dataclasses.replace(finished, epochs=2, checkpoint_every=4,
                                          steps_per_loop=3, probe_every_epochs=1,
                                          keep_checkpoints=2, strategy="mirrored"),
                      tf.distribute.get_strategy(), log=lambda _: None)
    assert trainer.restored_from.endswith("at step 9") and trainer.total_steps == 18
    assert trainer.claim.removed == ()
    after = folder_contents(finished.model_dir)
    assert json.loads(after.pop("config.json"))["epochs"] == 2  # the current settings
    before.pop("config.json")
    assert after == before  # nothing else written at the start
    trainer.close()


def test_pretrained_loads_the_backbone_only(tmp_path):
    prefix, donor = make_run_dir(tmp_path / "donor", seed=7)
    trainer = Trainer(_config(tmp_path, pretrained=prefix), tf.distribute.get_strategy(),
                      log=lambda _: None)
    assert trainer.restored_from.startswith("initialised")
    for layer in ("conv1_1", "conv2_1", "conv2_2"):
        np.testing.assert_array_equal(trainer.model.get_layer(layer).kernel.numpy(),
                                      donor.get_layer(layer).kernel.numpy())
    assert trainer.step == 0


def test_bad_configs_are_rejected(tmp_path):
    with pytest.raises(UsageError, match="--method=rotnet: choose one of nat, sc"):
        TrainConfig(model_dir=str(tmp_path), method="rotnet")
    with pytest.raises(UsageError, match="--batch_size=0: must be >= 1"):
        TrainConfig(model_dir=str(tmp_path), batch_size=0)
    with pytest.raises(UsageError, match="--sc_patch='big'"):
        TrainConfig(model_dir=str(tmp_path), sc_patch="big")
    with pytest.raises(DataError, match="fewer than one batch of 2048"):
        Trainer(_config(tmp_path, batch_size=2048), tf.distribute.get_strategy())


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("sc", {"sc_patch": "5x5"}),
                                           ("nat", {"nat_scope": "global"})])
def test_two_cpu_replicas_match_one_device(tmp_path, method, extra):
    """The same global batches on two replicas: BN over the global batch and gathered SC
    contrasts give the single-device SC step; NAT's global scope solves the same 256 x 256
    assignment as one device."""
    losses = {}
    for replicas in (1, 2):
        config = _config(tmp_path, f"{method}{replicas}", method=method, batch_size=256,
                         steps_per_loop=1, crop="pad", **extra)
        strategy = two_replica_strategy() if replicas == 2 else tf.distribute.get_strategy()
        trainer = Trainer(config, strategy, log=lambda _: None)
        trainer.train()
        losses[replicas] = scalars(config.model_dir)["loss"]
        if method == "nat":  # (the assignments may differ where float noise breaks near-ties)
            assert is_permutation(trainer.nat.assignment.numpy())
    assert len(losses[1]) == len(losses[2]) == 4
    np.testing.assert_allclose(losses[2], losses[1], rtol=2e-3)


def test_hooks_are_called_with_what_they_need_at_each_epoch_end(tmp_path, capsys):
    calls = []

    def hook(model, epochs_done, step, writer, log, chief):
        calls.append((model, epochs_done, step, writer, chief))
        log(f"hook after epoch {epochs_done}")

    trainer = Trainer(_config(tmp_path, epochs=2), tf.distribute.get_strategy(),
                      log=lambda _: None, hooks=[hook])
    trainer.train()
    per_epoch = trainer.steps_per_epoch
    assert [c[1:3] for c in calls] == [(1, per_epoch), (2, 2 * per_epoch)]
    assert all(c[0] is trainer.model and c[3] is trainer.writer and c[4] is True for c in calls)
    out = capsys.readouterr().out  # while it trains, `log` writes above the progress bar
    assert "hook after epoch 1" in out and "hook after epoch 2" in out


def test_the_probe_hook_needs_no_trainer(tmp_path):
    from models import build_model
    from train.pretrain_lib import ProbeHook

    config = _config(tmp_path, probe_every_epochs=2, probe_splits=2, probe_labels_per_class=3)
    hook = ProbeHook(config, "digits")
    writer = tf.summary.create_file_writer(os.path.join(config.model_dir, "train"))
    said = []
    model = build_model("nin_mnist", **config.model_kwargs())
    hook(model, 1, 5, writer, said.append, True)  # not a probe epoch
    hook(model, 2, 10, writer, said.append, False)  # not the chief
    history = os.path.join(config.model_dir, "probe_history.json")
    assert said == [] and hook.history == [] and not os.path.exists(history)
    hook(model, 2, 10, writer, said.append, True)
    writer.flush()
    [(epochs, mean, accuracies)] = hook.history
    assert epochs == 2 and len(accuracies) == 2 and mean == pytest.approx(np.mean(accuracies))
    assert said == [f"epoch 2: linear probe {100 * mean:.1f}% ± {100 * np.std(accuracies):.1f} "
                    "(sd over 2 label draws)"]
    assert scalars(config.model_dir)["probe/accuracy"] == [pytest.approx(mean)]
    with open(history) as f:
        assert json.load(f) == [[2, mean, accuracies]]
