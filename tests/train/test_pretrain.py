"""`python -m train.pretrain` as users run it: subprocesses on the embedded digits."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import ROOT, assignment, is_permutation, run_module, scalars, test_env
from train.config import parse_sc_endpoints, parse_sc_patch

# Small and quick: 1198 digits at batch 256 are 4 steps per epoch.
QUICK = ["--batch_size=256", "--nat_dim=16", "--steps_per_loop=2", "--export_dir=none",
         "--final_eval=none", "--probe_every_epochs=0"]


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


def test_the_finetune_table_passes_the_run_to_the_finetuning_protocol(tmp_path, monkeypatch):
    from evaluation import finetune
    from train.config import TrainConfig
    from train.pretrain import final_table

    seen = []

    def fake_run(config):
        seen.append(config)
        return {}, ""

    monkeypatch.setattr(finetune, "run", fake_run)
    config = TrainConfig(model_dir=str(tmp_path / "sc"), method="sc", final_eval="finetune",
                         probe_splits=2)
    assert final_table(config, model=None) == []
    assert seen[0].init == config.model_dir and seen[0].seeds == (0, 1)
    assert seen[0].compare_scratch and seen[0].dataset == "digits"


@pytest.mark.slow
def test_tiny_end_to_end_run_probes_exports_and_reports(tmp_path):
    model_dir = tmp_path / "run"
    result = _pretrain(f"--model_dir={model_dir}", "--epochs=2", "--batch_size=256",
                       "--nat_dim=16", "--probe_every_epochs=1", "--probe_splits=2",
                       "--final_eval=probe", f"--export_dir={tmp_path / 'export'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "nat pretrained" in result.stdout and "random" in result.stdout
    results = json.loads((model_dir / "results.json").read_text())
    assert results["steps"] == 8 and results["epochs"] == 2
    assert [row["init"] for row in results["final"]] == ["nat pretrained", "random"]
    assert all(0.1 < row["accuracy"] <= 1.0 for row in results["final"])
    assert [epoch for epoch, _ in results["probe_history"]] == [1, 2]
    assert (model_dir / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model"] == "nin_mnist" and config["model_kwargs"]["head"] == "nat"
    assert os.path.exists(tmp_path / "export" / "nin_mnist" / "1" / "saved_model.pb")
    assert {"loss", "lr", "images_per_sec", "probe/accuracy"} <= set(scalars(model_dir))


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_same_final_step(tmp_path):
    model_dir = tmp_path / "run"
    args = [f"--model_dir={model_dir}", "--epochs=6", *QUICK, "--steps_per_loop=1",
            "--checkpoint_every=2"]
    process = subprocess.Popen([sys.executable, "-m", "train.pretrain", *args], cwd=ROOT,
                               env=test_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and process.poll() is None:
        latest = tf.train.latest_checkpoint(str(model_dir)) if model_dir.exists() else None
        if latest and int(latest.rsplit("-", 1)[1]) >= 4:
            process.send_signal(signal.SIGKILL)
            killed_at = int(latest.rsplit("-", 1)[1])
            break
        time.sleep(0.05)
    process.wait(timeout=60)
    assert killed_at is not None, "the run ended before it could be killed"
    assert process.returncode == -signal.SIGKILL
    assert is_permutation(assignment(str(model_dir)))

    result = _pretrain(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((model_dir / "results.json").read_text())
    assert results["steps"] == 24 and results["epochs"] == 6
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-24")
    assert is_permutation(assignment(str(model_dir)))


def _losses(model_dir) -> list[float]:
    return scalars(model_dir)["loss"]


@pytest.mark.slow
def test_two_cpu_replicas_match_one_device(tmp_path):
    common = ["--epochs=1", *QUICK, "--steps_per_loop=1"]
    runs = {}
    for method, extra in (("sc", ["--sc_patch=5x5"]), ("nat", ["--nat_scope=global"])):
        for replicas in (1, 2):
            model_dir = tmp_path / f"{method}{replicas}"
            result = _pretrain(f"--method={method}", f"--model_dir={model_dir}",
                               f"--cpu_replicas={replicas}", *common, *extra)
            assert result.returncode == 0, result.stderr[-2000:]
            runs[method, replicas] = model_dir
    sc1, sc2 = _losses(runs["sc", 1]), _losses(runs["sc", 2])
    assert len(sc1) == len(sc2) == 4
    # Same global batches, BN over the global batch, contrasts gathered: the same SC step.
    np.testing.assert_allclose(sc2, sc1, rtol=2e-3)
    # NAT with the global scope solves the same 256 x 256 assignment as one device. (The
    # replica scope solves two 128 x 128 problems: a slightly higher loss; the two-worker test
    # runs it.)
    np.testing.assert_allclose(_losses(runs["nat", 2]), _losses(runs["nat", 1]), rtol=2e-3)
    # (The assignments themselves may differ where float noise breaks near-ties.)
    assert is_permutation(assignment(str(runs["nat", 2])))


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
    (["--dataset=svhn"], "--dataset=svhn: choose one of digits, mnist, cifar10"),
    (["--sc_patch=big"], "--sc_patch='big'"),
    (["--cpu_replicas=3", "--batch_size=128"], "batch_size 128 is not divisible by the 3"),
    (["--batch_size=2048"], "has 1198 images, fewer than one batch of 2048"),
    (["--dataset=cifar10", "--data_dir={tmp}"], "run `tfds build cifar10 --data_dir="),
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
