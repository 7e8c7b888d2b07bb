"""The settings every PASCAL VOC 2007 transfer run has (`VocRunConfig`, which each protocol's
config extends) and the choice of its input front. The run itself is
`evaluation.voc.common`; this module imports neither TensorFlow nor Keras, so the VOC binaries
check their flags before the framework loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from models import PRECISIONS, PREPROCESSINGS
from runtime import cli
from runtime.cli import UsageError, option
from runtime.run_config import pretraining_config
from runtime.vocabulary import DataLocation, Pretrained, RunFolder


@dataclass(frozen=True)
class VocRunConfig(RunFolder, Pretrained, DataLocation):
    """The settings every VOC protocol run has (each protocol's config extends it): with the
    shared --model_dir (required), --pretrained ('' = the random-init baseline), --data_dir
    and --manual_dir (for --download) of runtime/vocabulary.py."""

    preprocessing: str = option("", "Input front; default: the pretraining run's "
                                "config.json, else sobel.")
    checkpoint_every: int = option(5000, "Steps between checkpoints.", lower=1)
    keep_checkpoints: int = option(2, "Checkpoints to keep.", lower=1)
    log_every: int = option(100, "Steps between log lines.", lower=1)
    seed: int = option(0, "Random seed.")
    download: bool = option(False, "Prepare voc/2007 first (may download).")
    mixed_precision: str = option("none", "Compute precision of the network: none (float32), "
                                  "bf16 or fp16 (with dynamic loss scaling).",
                                  choices=PRECISIONS)

    # Settings a restart may change, for every VOC protocol (evaluation/voc/common.py): how often to
    # log and save, where data, checkpoints and detection proposals are, how many steps (to
    # extend a run), and how test batches are cut. Every other setting is fingerprinted.
    RESUMABLE: ClassVar[tuple[str, ...]] = (
        "model_dir", "checkpoint_every", "keep_checkpoints", "log_every", "data_dir",
        "manual_dir", "download", "num_steps", "test_batch_images", "test_roi_chunk",
        "proposal_cache", "proposal_workers", "compute_proposals", "only_proposals")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise UsageError (one line, naming the setting) for an inconsistent config."""
        cli.require("model_dir", self.model_dir)
        if self.preprocessing and self.preprocessing not in PREPROCESSINGS:
            raise UsageError(f"preprocessing={self.preprocessing!r}: choose one of "
                             f"{', '.join(PREPROCESSINGS)}")
        cli.check_choice("mixed_precision", self.mixed_precision, PRECISIONS)

    def positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 1:
                raise UsageError(f"{name}={getattr(self, name)} must be positive")

    @property
    def data_args(self) -> dict:
        return dict(data_dir=self.data_dir or None, manual_dir=self.manual_dir or None,
                    download=self.download)


def resolve_preprocessing(config: VocRunConfig) -> str:
    """The flag if set, else the pretraining run's, else "sobel" (the NAT input).

    Raises UsageError if the pretraining run is not an AlexNet.
    """
    pretraining = pretraining_config(config.pretrained)
    if pretraining is not None and pretraining.get("model", "alexnet") != "alexnet":
        raise UsageError(f"--pretrained={config.pretrained} is a "
                         f"{pretraining.get('model')!r} run, not an AlexNet")
    if config.preprocessing:
        return config.preprocessing
    if pretraining is not None:
        return pretraining.get("model_kwargs", {}).get("preprocessing", "sobel")
    return "sobel"
