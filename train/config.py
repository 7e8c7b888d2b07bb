"""`TrainConfig`: every setting of a pretraining run. Its fields ARE the flags of
`python -m train.pretrain` (runtime/cli.py generates them), so a config built in code and one
built on the command line have the same defaults. It is written to `<model_dir>/config.json`.

Every field is either in the run's fingerprint (`FINGERPRINT_GROUPS`: it changes the result,
so a run folder refuses a restart where it differs; models/runs.py) or in `RESUMABLE`: what a
restart may change (e.g. more --epochs to extend a finished run, --checkpoint_every, the
probe period, where data and exports live).

This module imports neither TensorFlow nor Keras.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import ClassVar

from absl import flags

from data import CROPS, PRETRAIN_DATASETS, is_pretrain_dataset
from losses import NAT_SCOPES, NAT_TARGETS, SC_POOLS
from models import MODEL_NAMES, PRECISIONS, PREPROCESSINGS
from runtime import cli
from runtime.cli import UsageError, check_choice, check_range, option
from runtime.ownership import fingerprint_of
from runtime.vocabulary import DataLocation, Pretrained, RunFolder
from train.data_service import check_address

METHODS = ("nat", "sc")
FINAL_EVALS = ("probe", "finetune", "none")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")


def parse_sc_endpoints(text: str) -> tuple[tuple[str, float], ...]:
    """'sc:1,block1:0.5' -> (("sc", 1.0), ("block1", 0.5)); a bare name has weight 1."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, weight = item.partition(":")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise UsageError(f"--sc_endpoints: bad weight in {item!r}") from None
        if not value >= 0 or value == float("inf"):
            raise UsageError(f"--sc_endpoints: weights must be finite and >= 0; got {item!r}")
        out.append((name, value))
    if not out:
        raise UsageError("--sc_endpoints names no endpoint")
    return tuple(out)


def parse_sc_patch(text: str) -> float | tuple[int, int]:
    """'0.3' (fraction of the map area) or '3x3' (cells)."""
    try:
        if "x" in text.lower():
            h, w = (int(v) for v in text.lower().split("x"))
            if h < 1 or w < 1:
                raise ValueError
            return (h, w)
        value = float(text)
        if not 0 < value <= 1:
            raise ValueError
        return value
    except ValueError:
        raise UsageError(f"--sc_patch={text!r}: give an area fraction in (0, 1] or HxW "
                         "cells") from None


def parse_input_shape(text: str | None) -> tuple[int, int, int] | None:
    """'H,W,C' -> (H, W, C); None or '' -> None (the model's own)."""
    if not text:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError
        return shape
    except ValueError:
        raise UsageError(f"--input_shape={text!r}: expected H,W,C") from None


@dataclass(frozen=True)
class TrainConfig(RunFolder, Pretrained, DataLocation):
    """The settings of a pretraining run (see train/trainer.py for what each one does).

    From the shared bases (runtime/vocabulary.py): --model_dir, the run folder (default
    runs/<method>_<model>_<dataset>); --pretrained, a run whose backbone weights a fresh run
    starts from (never a resume); --data_dir and --manual_dir.
    """

    method: str = option("nat", "Pretraining method.", choices=METHODS)
    model: str = option("nin_mnist", "Network to pretrain.", choices=MODEL_NAMES)
    dataset: str = option("digits", "Pretraining images: one of "
                          f"{', '.join(PRETRAIN_DATASETS)}.")
    input_shape: str | None = option(None, "H,W,C of the model input (default: the model's).")
    preprocessing: str | None = option(None, "AlexNet's fixed front (default sobel).",
                                       choices=PREPROCESSINGS)
    batch_size: int = option(128, "Global batch size (split over the replicas).", lower=1)
    epochs: int = option(60, "Epochs over the dataset.", lower=1)
    lr: float = option(0.05, "Initial learning rate l0.")
    momentum: float = option(0.9, "SGD momentum.", lower=0.0)
    weight_decay: float = option(5e-4, "L2 penalty wd/2 ||W||^2 on the kernels.", lower=0.0)
    lr_t0: int = option(0, "Batches at constant lr before the decay l0/(1+g(t-t0)).", lower=0)
    lr_gamma: float = option(0.0, "gamma of the decay l0/(1+gamma(t-t0)); 0 = constant.",
                             lower=0.0)
    plateau_patience: int = option(0, "Epochs without loss improvement before the lr is cut "
                                   "by --plateau_factor (0 = never).", lower=0)
    plateau_factor: float = option(0.1, "Learning-rate cut on a plateau, in (0, 1).")
    plateau_min_delta: float = option(1e-3, "Smallest fall of the epoch loss that counts as an "
                                      "improvement.", lower=0.0)
    nat_dim: int = option(64, "NAT target dimension d.", lower=1)
    nat_reassign_every: int = option(3, "Re-assign targets every k epochs (0 = fixed P).",
                                     lower=0)
    nat_scope: str = option("replica", "Hungarian problem per replica or global.",
                            choices=NAT_SCOPES)
    nat_targets: str = option("sphere", "NAT targets: on the unit sphere (the method) or one-hot "
                              "(the discrete baseline of NAT Sec. 4.1).", choices=NAT_TARGETS)
    sc_endpoints: str = option("sc:1", "SC endpoints with weights, 'name:w,name:w'.")
    sc_patch: str = option("0.3", "SC window: a fraction of the map area, or HxW cells.")
    sc_squared: bool = option(False, "SC on squared L2 distances.")
    sc_symmetric: bool = option(True, "Average SC with its transposed form.")
    sc_pool: str = option("avg", "How an SC window becomes a vector: averaged (the zoo's "
                          "reading, losses/spatial_contrasting.py) or flattened.",
                          choices=SC_POOLS)
    crop: str = option("resize", "Random crop: pad-and-crop, resized crop, short side then "
                       "crop, or none.", choices=CROPS)
    crop_pad: int = option(2, "Padding (pixels) of --crop=pad.", lower=0)
    crop_min_scale: float = option(0.35, "Smallest area fraction of --crop=resize.")
    crop_short_side: int = option(256, "Shorter side (pixels) the image is scaled to before "
                                  "the random crop of --crop=short_side.", lower=1)
    flip: bool = option(False, "Random horizontal flips.")
    strategy: str = option("auto", "tf.distribute strategy.", choices=STRATEGIES)
    data_service: str = option("", "grpc://HOST:PORT of a tf.data service dispatcher (python "
                               "-m train.data_service) whose workers decode and augment the "
                               "images; the batches are the same as without it. '' = here.")
    mixed_precision: str = option("none", "Compute precision of the network: none (float32), "
                                  "bf16 or fp16 (with dynamic loss scaling); variables, BN "
                                  "statistics, the heads and the losses stay float32.",
                                  choices=PRECISIONS)
    jit_compile: bool = option(False, "Compile the network's forward and backward pass with XLA "
                               "(one replica; the NAT assignment runs outside). XLA's fused "
                               "kernels round differently, so it is part of the run's "
                               "fingerprint.")
    deterministic: bool = option(False, "Deterministic ops (tf.config.experimental."
                                 "enable_op_determinism): needed for bitwise-exact resumes "
                                 "on GPU, where cuDNN convolutions and SC's gather gradients "
                                 "are not deterministic otherwise; slower there, and ops "
                                 "without a deterministic kernel raise. CPU ops already are.")
    cpu_replicas: int = option(1, "Split the CPU into N logical devices (testing).", lower=1)
    steps_per_loop: int = option(10, "Steps per tf.function call.", lower=1)
    checkpoint_every: int = option(100, "Steps between checkpoints (also at epoch ends).",
                                   lower=1)
    keep_checkpoints: int = option(3, "Checkpoints kept in the run folder.", lower=1)
    seed: int = option(0, "Seed of the targets, the data order and the augmentation.", lower=0)
    export_dir: str | None = option(None, "SavedModel base directory (default "
                                    "<model_dir>/export; 'none' skips the export).")
    probe_every_epochs: int = option(10, "Linear probe every k epochs (0 = never).", lower=0)
    probe_dataset: str | None = option(None, "Labelled dataset of the probes (default: "
                                       "--dataset).")
    probe_labels_per_class: int = option(10, "Labels per class of the probes.", lower=1)
    probe_splits: int = option(5, "Label draws of the probes.", lower=1)
    final_eval: str = option("probe", "Final table: probe, finetune or none.",
                             choices=FINAL_EVALS)
    inject_nan_at_step: int = option(-1, "Testing aid: make the loss of that step NaN.")

    # What a run's fingerprint holds, by group; names that are not fields are facts the run
    # derives: the build_model kwargs, the number of images (and, for a folder, a digest of
    # its file list), the input pipelines (workers shard the data) and the size of NAT's
    # Hungarian problems (per replica or global).
    FINGERPRINT_GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "method": ("method",),
        "model": ("model", "input_shape", "preprocessing", "nat_dim", "model_kwargs",
                  "mixed_precision"),
        "data": ("dataset", "images", "files"),
        "batch": ("batch_size",),
        "seed": ("seed",),
        "loss": ("nat_reassign_every", "nat_scope", "nat_targets", "sc_endpoints", "sc_patch",
                 "sc_squared", "sc_symmetric", "sc_pool"),
        "schedule": ("lr", "momentum", "weight_decay", "lr_t0", "lr_gamma", "plateau_patience",
                     "plateau_factor", "plateau_min_delta"),
        "augmentation": ("crop", "crop_pad", "crop_min_scale", "crop_short_side", "flip"),
        "init": ("pretrained",),
        "evaluation": ("probe_dataset", "probe_labels_per_class", "probe_splits", "final_eval"),
        "distribution": ("workers", "nat_problem"),
        "numerics": ("jit_compile", "deterministic"),
    }
    # What a restart may change: the length of the run, how often it saves and probes, where
    # its data and exports are, the device split (its effect is in the facts above).
    RESUMABLE: ClassVar[tuple[str, ...]] = (
        "model_dir", "epochs", "data_dir", "manual_dir", "strategy", "cpu_replicas",
        "steps_per_loop", "checkpoint_every", "keep_checkpoints", "export_dir",
        "probe_every_epochs", "inject_nan_at_step", "data_service")

    def __post_init__(self):
        for field in dataclasses.fields(self):
            choices = field.metadata.get("choices")
            value = getattr(self, field.name)
            if choices and value is not None:
                check_choice(field.name, value, choices)
            lower = field.metadata.get("lower")
            if lower is not None:
                check_range(field.name, value, lower)
        if not is_pretrain_dataset(self.dataset):
            raise UsageError(f"--dataset={self.dataset}: choose one of "
                             f"{', '.join(PRETRAIN_DATASETS)}")
        if not self.lr > 0:
            raise UsageError(f"--lr={self.lr}: must be > 0")
        if not 0 < self.plateau_factor < 1:
            raise UsageError(f"--plateau_factor={self.plateau_factor}: must be in (0, 1)")
        if not 0 < self.crop_min_scale <= 1:
            raise UsageError(f"--crop_min_scale={self.crop_min_scale}: must be in (0, 1]")
        if self.preprocessing is not None and self.model != "alexnet":
            raise UsageError("--preprocessing applies to --model=alexnet only")
        parse_sc_endpoints(self.sc_endpoints)
        parse_sc_patch(self.sc_patch)
        parse_input_shape(self.input_shape)
        check_address("data_service", self.data_service)
        if not self.model_dir:
            name = self.dataset.replace(":", "_").replace("/", "_")
            object.__setattr__(self, "model_dir",
                               os.path.join("runs", f"{self.method}_{self.model}_{name}"))

    @property
    def sc_weights(self) -> dict[str, float]:
        """{endpoint: weight} of `sc_endpoints`."""
        return dict(parse_sc_endpoints(self.sc_endpoints))

    @property
    def sc_window(self) -> float | tuple[int, int]:
        """The SC window of `sc_patch`: an area fraction or (h, w) cells."""
        return parse_sc_patch(self.sc_patch)

    @property
    def augment(self):
        """The data.augment.Augment of the crop and flip settings."""
        # deferred: data.augment imports TensorFlow; binaries read this config before it loads
        from data.augment import Augment

        return Augment(crop=self.crop, pad=self.crop_pad, min_scale=self.crop_min_scale,
                       short_side=self.crop_short_side, flip=self.flip)

    def model_kwargs(self) -> dict:
        """Keyword arguments of `build_model` for the pretraining network."""
        kwargs: dict = {}
        if self.method == "nat":
            kwargs.update(head="nat", feature_dim=self.nat_dim)
        else:
            kwargs.update(head="none")
        shape = parse_input_shape(self.input_shape)
        if shape is not None:
            kwargs["input_shape"] = shape
        if self.preprocessing is not None:
            kwargs["preprocessing"] = self.preprocessing
        return kwargs

    def fingerprint(self, images: int, files: str | None, workers: int, replicas: int) -> dict:
        """The run's fingerprint (FINGERPRINT_GROUPS) for a dataset of `images` images (a
        folder's file-list digest `files`), `workers` input pipelines and `replicas`.

        `workers` is the cluster size (1 without TF_CONFIG): each worker reads its own shard
        of every batch and the gradients add up across workers in an order that depends on
        how many there are, so a restart needs the same number of workers (a refusal says so,
        train/cluster.py); the workers' hosts and ports are not in it and may change between
        restarts."""
        problem = None
        if self.method == "nat":
            problem = self.batch_size // replicas if self.nat_scope == "replica" else \
                self.batch_size
        return fingerprint_of(self, self.RESUMABLE, model_kwargs=self.model_kwargs(),
                              images=images, files=files, workers=workers, nat_problem=problem)

    def to_json(self) -> dict:
        """config.json: every setting, plus the model's kwargs."""
        return {**dataclasses.asdict(self), "model_kwargs": self.model_kwargs()}


def from_flagfile(path: str, program: str, **changes) -> TrainConfig:
    """The TrainConfig of `--flagfile=path` (a recipe in train/configs/), with `changes`."""
    values = flags.FlagValues()
    cli.define_flags(TrainConfig, values, program)
    values([program, f"--flagfile={path}"])
    return dataclasses.replace(cli.config_from_flags(TrainConfig, values), **changes)
