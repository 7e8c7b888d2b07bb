"""`python -m train.pretrain` as users run it: subprocesses on the embedded digits."""

import glob
import json
import os
import socket
import subprocess
import sys

import pytest
import tensorflow as tf

from tests.helpers import ROOT, assignment, is_permutation, run_module, test_env
from train import pretrain
from train.config import parse_sc_endpoints, parse_sc_patch

# Small and quick: 1198 digits at batch 256 are 4 steps per epoch.
QUICK = ["--batch_size=256", "--nat_dim=16", "--steps_per_loop=2", "--export_dir=none",
         "--final_eval=none", "--probe_every_epochs=0", "--crop=pad"]


def _pretrain(*args, timeout=600, env=None) -> subprocess.CompletedProcess:
    return run_module("train.pretrain", *args, timeout=timeout, env=env)


def test_flag_parsers():
    assert parse_sc_endpoints("sc:1,block1:0.5") == (("sc", 1.0), ("block1", 0.5))
    assert parse_sc_endpoints("sc") == (("sc", 1.0),)
    assert parse_sc_patch("0.3") == 0.3
    assert parse_sc_patch("6x5") == (6, 5)
    for bad in ("0", "1.5", "ax3", "0x2"):
        with pytest.raises(ValueError, match="--sc_patch"):
            parse_sc_patch(bad)
    with pytest.raises(ValueError, match="--sc_endpoints: bad weight"):
        parse_sc_endpoints("sc:heavy")


def test_help_exits_0_and_a_bad_flag_exits_1_with_one_line(capsys):
    # The end-to-end run, kills and resumes are in tests/train/test_faults.py.
    for flag in ("--help", "--helpfull"):
        with pytest.raises(SystemExit) as exit_info:
            pretrain.main(["train.pretrain", flag])
        assert exit_info.value.code == 0
        assert "--checkpoint_every" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["train.pretrain", "--batch_size=many"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == ("train.pretrain: error: flag --batch_size=many: "
                                       "invalid literal for int() with base 10: 'many' (see "
                                       "--help)\n")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_train_together_on_loopback(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    model_dir = tmp_path / "run"
    processes = []
    for index in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers},
                                "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "train.pretrain", f"--model_dir={model_dir}", "--epochs=2",
             *QUICK, "--strategy=multi_worker"],
            cwd=ROOT, env=test_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-2000:]
    # Worker 0 is the chief: its checkpoints hold the whole run, 2 epochs of 4 global steps.
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-8")
    assert is_permutation(assignment(str(model_dir)))
    results = json.loads((model_dir / "results.json").read_text())
    assert results["steps"] == 8
    # Only the chief writes into model_dir; the other worker's copies went to a temporary dir.
    assert {os.path.dirname(p) for p in glob.glob(str(tmp_path / "*" / "ckpt-*.index"))} == {
        str(model_dir)}


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--model=resnet"], "--model=resnet: value should be one of <alexnet|nin_stl10|"),
    (["--method=rotnet"], "value should be one of <nat|sc>"),
    (["--dataset=svhn"], "--dataset=svhn: choose one of digits, mnist, fashion_mnist, cifar10"),
    (["--sc_patch=big"], "--sc_patch='big'"),
    (["--cpu_replicas=3", "--batch_size=128"], "batch_size 128 is not divisible by the 3"),
    (["--batch_size=2048"], "has 1198 images, fewer than one batch of 2048"),
    (["--dataset=cifar10", "--data_dir={tmp}"], "run `tfds build cifar10 --data_dir="),
    (["--probe_dataset=mnist", "--data_dir={tmp}"], "run `tfds build mnist --data_dir="),
    (["--dataset=folder:{tmp}"], "no readable image"),
])
def test_bad_input_is_a_one_line_error(tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    result = _pretrain(f"--model_dir={tmp_path / 'run'}", *args, timeout=300)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if message in line]
    assert errors, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
