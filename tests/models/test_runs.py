"""The run folder (models/runs.py): config.json, rebuilding a run's network, checkpoints."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from models import build_model
from models.runs import (
    RunLocked,
    RunMismatch,
    abandon_run,
    backbone_layers,
    claim_run,
    load_run_model,
    open_checkpoints,
    pretraining_config,
    read_config,
    release_run,
    start_run,
    write_atomic,
    write_config,
    write_json_atomic,
    write_json_if_changed,
)
from models.weights import named_variables
from tests.helpers import ROOT, folder_contents, make_run_dir, test_env


def test_pretrained_weights_really_load(tmp_path):
    path, saved = make_run_dir(tmp_path / "run", seed=3, config={"method": "sc"},
                               head="nat", feature_dim=16)
    loaded = load_run_model(path)
    assert (loaded.name, loaded.config["method"]) == ("nin_mnist", "sc")
    assert loaded.kwargs == {"head": "nat", "feature_dim": 16}
    keys = named_variables(loaded.model)
    assert loaded.loaded == len(keys) and loaded.checkpoint == tf.train.latest_checkpoint(path)
    reader = tf.train.load_checkpoint(path)
    fresh = named_variables(build_model("nin_mnist", head="nat", feature_dim=16))
    differs = set()
    for key, variable in keys.items():
        # object-graph keys escape "." as ".." (and "/" as ".S")
        escaped = key.replace(".", "..").replace("/", ".S")
        stored = reader.get_tensor(f"model/{escaped}/.ATTRIBUTES/VARIABLE_VALUE")
        np.testing.assert_array_equal(variable.numpy(), stored, err_msg=key)
        np.testing.assert_array_equal(stored, named_variables(saved)[key].numpy())
        if not np.array_equal(fresh[key].numpy(), stored):
            differs.add(key)
    # a fresh network draws other random kernels; the rest starts at constants
    assert differs == {key for key in keys if key.endswith(".kernel")}
    assert len(differs) == 4


def test_overrides_random_init_and_another_head(tmp_path):
    path, _ = make_run_dir(tmp_path / "run", head="nat", feature_dim=8)
    softmax = load_run_model(path, overrides={"head": "softmax", "num_classes": 3})
    assert softmax.model.output["logits"].shape[-1] == 3
    assert softmax.loaded == len(named_variables(build_model("nin_mnist", head="none")))
    random = load_run_model(path, init="random")
    assert random.checkpoint is None and random.loaded == 0
    bare = load_run_model("", "nin_cifar10", init="random")
    assert bare.name == "nin_cifar10" and bare.config == {}


def test_missing_folders_configs_and_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"run folder {tmp_path / 'no'} does not exist"):
        read_config(str(tmp_path / "no"))
    with pytest.raises(FileNotFoundError, match=r"has no config\.json: not a run folder"):
        load_run_model(str(tmp_path))
    write_config(str(tmp_path), {"model": "nin_mnist", "model_kwargs": {}})
    with pytest.raises(FileNotFoundError, match="no checkpoint in directory"):
        load_run_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'gone'} does not exist"):
        load_run_model(str(tmp_path), checkpoint=str(tmp_path / "gone"))
    with pytest.raises(ValueError, match="no model name"):
        load_run_model("", "", init="random")


def test_config_is_written_atomically_and_found_from_a_prefix(tmp_path):
    path = write_config(str(tmp_path / "run"), {"model": "alexnet", "model_kwargs": {}, "b": 1})
    assert json.loads(open(path).read())["b"] == 1
    assert os.listdir(tmp_path / "run") == ["config.json"]  # no temporary file left
    assert pretraining_config(str(tmp_path / "run" / "ckpt-3"))["model"] == "alexnet"
    assert pretraining_config(str(tmp_path / "run")) is not None
    assert pretraining_config(str(tmp_path)) is None and pretraining_config("") is None


def test_open_checkpoints_restores_the_latest(tmp_path):
    step = tf.Variable(0)
    _, manager, latest = open_checkpoints(str(tmp_path), {"step": step}, keep=2)
    assert latest is None
    step.assign(7)
    manager.save(checkpoint_number=7)
    again = tf.Variable(0)
    _, _, latest = open_checkpoints(str(tmp_path), {"step": again}, keep=2)
    assert latest.endswith("ckpt-7") and int(again.numpy()) == 7


def test_backbone_layers_are_the_layers_up_to_the_head():
    layers = backbone_layers("nin_mnist", head="softmax", num_classes=5)
    assert layers[0] == "conv1_1" and "embedding_fc" not in layers and "conv3_1" not in layers
    assert backbone_layers("alexnet", head="nat", feature_dim=8)[-1] == "fc7_bn"


# ------------------------------------------------------------------------------- ownership

HOLD = ("import sys, time\n"
        "from models.runs import claim_run\n"
        "claim_run(sys.argv[1], {'seed': 0})\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")


def test_a_second_process_stops_at_once_and_a_killed_owner_leaves_no_lock(tmp_path):
    folder = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, folder], cwd=ROOT, env=test_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunLocked) as refused:
            claim_run(folder, {"seed": 0})
        assert str(refused.value) == (f"{folder} is in use by another process (PID "
                                      f"{holder.pid}): wait for it to end, or use another "
                                      "--model_dir")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    # The OS released the lock of the killed process: nothing stale is left to remove.
    claim = claim_run(folder, {"seed": 0})
    assert claim.fresh
    assert open(os.path.join(folder, ".lock")).read() == f"{os.getpid()}\n"
    release_run(folder)


def test_a_start_with_other_settings_is_refused_before_anything_is_written(tmp_path):
    folder = str(tmp_path / "run")
    claim = claim_run(folder, {"seed": 0, "lr": 0.05, "model_kwargs": {"head": "nat"}})
    start_run(claim, {"seed": 0, "lr": 0.05, "epochs": 3})
    before = folder_contents(folder)
    with pytest.raises(RunMismatch) as refused:
        claim_run(folder, {"seed": 1, "lr": 0.05, "model_kwargs": {"head": "none"},
                           "crop": "pad"})
    assert str(refused.value) == (
        f"{folder} holds a run with other settings (crop: (none) -> \"pad\"; model_kwargs: "
        '{"head": "nat"} -> {"head": "none"}; seed: 0 -> 1): rerun with the recorded '
        "settings, or use another --model_dir")
    assert folder_contents(folder) == before
    # The same settings are accepted; only config.json (the current settings) may change.
    again = claim_run(folder, {"seed": 0, "lr": 0.05, "model_kwargs": {"head": "nat"}})
    assert not again.fresh
    start_run(again, {"seed": 0, "lr": 0.05, "epochs": 5})
    after = folder_contents(folder)
    assert json.loads(after.pop("config.json"))["epochs"] == 5
    before.pop("config.json")
    assert after == before
    release_run(folder)


def test_a_failed_first_start_leaves_no_folder(tmp_path):
    folder = tmp_path / "fresh"

    def fails():
        raise ValueError("dataset folder:x: no such directory")

    with pytest.raises(ValueError, match="no such directory"):
        claim_run(str(folder), fails)
    assert not folder.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    claim = claim_run(str(existing), {"seed": 0})
    abandon_run(claim)  # e.g. the restore failed: the folder is as it was
    assert folder_contents(existing) == {"notes.txt": b"mine"}


def test_a_folder_of_an_earlier_version_is_refused(tmp_path):
    folder, _ = make_run_dir(tmp_path / "old")
    before = folder_contents(folder)
    with pytest.raises(RunMismatch, match=f"^{folder} holds a run without fingerprint.json "
                       r"\(written by an earlier version of the zoo\): use another --output"):
        claim_run(folder, {"seed": 0}, what="--output_dir")
    assert folder_contents(folder) == before


def test_temporaries_of_dead_processes_are_removed_and_named(tmp_path):
    folder = tmp_path / "run"
    (folder / "ckpt-12_temp").mkdir(parents=True)
    (folder / "ckpt-12_temp" / "part-00000-of-00001.data-00000-of-00001.tempstate77").touch()
    (folder / "ckpt-8.index.tempstate123").touch()
    (folder / f"checkpoint.tmp{'ab' * 16}").touch()
    (folder / ".results.json.tmp4242.json").touch()
    (folder / "fingerprint.json").write_text('{"seed": 0}')
    keep = ["fingerprint.json", "ckpt-8.index", "ckpt-8.data-00000-of-00001", "checkpoint",
            "train", "my_temp", "results.json"]
    for name in keep[1:4] + keep[6:]:
        (folder / name).touch()
    for name in keep[4:6]:
        (folder / name).mkdir()
    claim = claim_run(str(folder), {"seed": 0})
    assert claim.removed == (".results.json.tmp4242.json", f"checkpoint.tmp{'ab' * 16}",
                             "ckpt-12_temp", "ckpt-8.index.tempstate123")
    assert sorted(os.listdir(folder)) == sorted([".lock", *keep])
    release_run(str(folder))


def test_atomic_writes_leave_nothing_half_written(tmp_path):
    path = str(tmp_path / "results.json")
    write_json_atomic(path, {"a": 1})

    def breaks(tmp):
        with open(tmp, "w") as f:
            f.write('{"a": ')
        raise OSError(28, "No space left on device", tmp)

    with pytest.raises(OSError):
        write_atomic(path, breaks)
    assert os.listdir(tmp_path) == ["results.json"]
    assert json.loads(open(path).read()) == {"a": 1}
    assert not write_json_if_changed(path, {"a": 1})
    assert write_json_if_changed(path, {"a": 2})
