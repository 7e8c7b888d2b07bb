"""TrainConfig: its fields are the flags, every flagfile parses into it, bad values are named."""

import dataclasses
import glob
import os

import pytest
from absl import flags

from runtime import cli
from runtime.cli import UsageError
from tests.helpers import ROOT
from train.config import TrainConfig

FLAGFILES = sorted(glob.glob(os.path.join(ROOT, "train", "configs", "*.flags")))


def _parse(*argv: str) -> TrainConfig:
    fv = flags.FlagValues()
    cli.define_flags(TrainConfig, fv, "train.pretrain")
    fv(["train.pretrain", *argv])
    return cli.config_from_flags(TrainConfig, fv)


def test_the_flags_defaults_are_the_config_defaults():
    assert _parse() == TrainConfig()
    assert TrainConfig().model_dir == os.path.join("runs", "nat_nin_mnist_digits")


@pytest.mark.parametrize("path", FLAGFILES, ids=[os.path.basename(p) for p in FLAGFILES])
def test_every_flagfile_parses_into_a_valid_config(path):
    config = _parse(f"--flagfile={path}")
    assert config.method in ("nat", "sc")


def test_the_imagenet_flagfile_is_the_released_pretraining():
    path = os.path.join(ROOT, "train", "configs", "nat_alexnet_imagenet.flags")
    config = _parse(f"--flagfile={path}")
    # plain SGD at 0.01 on a loss summed over the batch of 256: 0.01 * 256 on the batch mean
    assert (config.momentum, config.weight_decay, config.lr) == (0.0, 0.0, 0.01 * 256)
    assert (config.epochs, config.batch_size, config.nat_dim, config.nat_reassign_every) == (
        100, 256, 2048, 3)
    assert config.lr_gamma == 0.0  # the released code never decays the step size
    assert (config.crop, config.crop_short_side, config.flip) == ("short_side", 256, True)
    assert config.model_kwargs() == {"head": "nat", "feature_dim": 2048,
                                     "preprocessing": "sobel"}


@pytest.mark.parametrize("argv, message", [
    (["--lr=0"], "--lr=0.0: must be > 0"),
    (["--plateau_factor=1.5"], "--plateau_factor=1.5: must be in (0, 1)"),
    (["--dataset=svhn"], "--dataset=svhn: choose one of digits"),
    (["--preprocessing=gray"], "--preprocessing applies to --model=alexnet only"),
    (["--sc_endpoints=sc:heavy"], "--sc_endpoints: bad weight in 'sc:heavy'"),
    (["--input_shape=28,28"], "--input_shape='28,28': expected H,W,C"),
])
def test_bad_values_name_the_flag(argv, message):
    with pytest.raises(UsageError) as caught:
        _parse(*argv)
    assert message in str(caught.value)


def test_every_setting_is_fingerprinted_or_resumable():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    grouped = [name for names in TrainConfig.FINGERPRINT_GROUPS.values() for name in names]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) & set(TrainConfig.RESUMABLE) == set()
    assert (set(grouped) & fields) | set(TrainConfig.RESUMABLE) == fields
    # XLA's kernels and nondeterministic GPU kernels change the updates: not resumable.
    assert {"jit_compile", "deterministic"} <= set(grouped)
    facts = set(grouped) - fields
    assert facts == {"model_kwargs", "images", "files", "workers", "nat_problem"}
