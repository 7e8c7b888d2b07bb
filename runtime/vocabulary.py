"""The flags that mean the same thing in every binary, declared once: small frozen dataclass
bases that the binaries' configs inherit (runtime/cli.py turns their fields into flags).

One name per meaning:

    --model_dir    OUTPUT: the run folder this binary trains, checkpoints and resumes
                   (train.pretrain, the VOC binaries)
    --output_dir   OUTPUT: the folder this binary writes its results to, with no checkpoints
                   to resume (probes, fine-tuning, ablations, feature extraction)
    --pretrained   INPUT: the pretraining run folder, or one checkpoint prefix of it, that
                   the binary reads weights (or a run's records) from
    --init         pretrained | random: the weights of --pretrained, or a seeded random init
                   (probes, figures and exports: the --pretrained run's own seed, so that it
                   is the run's random twin, else --seed; fine-tuning: each of --seeds)
    --data_dir, --manual_dir   where tfds finds the data

Every field has a default, so a config may add fields after those of its bases.
This module imports nothing of the zoo, neither TensorFlow nor Keras.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.cli import option

INITS = ("pretrained", "random")


@dataclass(frozen=True)
class RunFolder:
    """A binary that trains a run folder and resumes it (`--model_dir`)."""

    model_dir: str = option("", "Output: the run folder this binary trains, checkpoints and "
                            "resumes (config.json, checkpoints, results); a rerun resumes it.")


@dataclass(frozen=True)
class OutputFolder:
    """A binary that writes results, not checkpoints (`--output_dir`)."""

    output_dir: str = option("", "Output: the folder this binary writes its results to (no "
                             "checkpoints to resume); '' = the default of its --help text.")


@dataclass(frozen=True)
class Pretrained:
    """A binary that reads a pretraining run's weights (`--pretrained`)."""

    pretrained: str = option("", "Input: the pretraining run folder (its latest checkpoint) or "
                             "one checkpoint prefix of it, read for weights.")


@dataclass(frozen=True)
class PretrainedInput(Pretrained):
    """A binary that reads `--pretrained` weights or starts from a seeded random init."""

    init: str = option("pretrained", "pretrained: the weights of --pretrained; random: a seeded "
                       "random init instead (its seed: see the binary's seed flag).",
                       choices=INITS)


@dataclass(frozen=True)
class DataDir:
    """Where tfds finds prepared data (`--data_dir`)."""

    data_dir: str | None = option(None, "tfds data directory (default: tfds's).")


@dataclass(frozen=True)
class DataLocation(DataDir):
    """Where tfds finds a binary's data (`--data_dir`, `--manual_dir`)."""

    manual_dir: str | None = option(None, "tfds manual directory: the files tfds cannot "
                                    "download (ImageNet tars, stl10_binary, VOC).")
