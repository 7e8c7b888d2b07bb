"""`python -m train.pretrain` as users run it: subprocesses on the embedded digits."""

import subprocess

import pytest

from tests.helpers import run_module
from train import pretrain
from train.config import parse_sc_endpoints, parse_sc_patch


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
