"""Unsupervised pretraining by Noise As Targets (NAT) or Spatial Contrasting (SC).

    python -m train.pretrain                                   # NAT, nin_mnist, embedded digits
    python -m train.pretrain --flagfile=train/configs/sc_digits.flags
    python -m train.pretrain --flagfile=train/configs/nat_alexnet_imagenet.flags \
        --data_dir=/data/tfds --manual_dir=/data/imagenet --model_dir=runs/nat_alexnet

Protocol (train/trainer.py): the model is trained without labels on the dataset's images;
checkpoints go to --model_dir every --checkpoint_every steps and at each epoch end, and a
rerun with the same --model_dir resumes. Every --probe_every_epochs epochs a linear probe
measures the frozen features (NAT Figure 2). At the end the feature extractor is exported as a
SavedModel (train/export.py) and the final table compares the pretrained network with the same
network at random init: a linear probe (--final_eval=probe) or whole-network fine-tuning with
labels (--final_eval=finetune, the SC protocol).

Bad flags stop with a one-line error and exit status 1 (2 for flag parsing errors).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

from models import MODELS
from train.data import CROPS, DATASETS, Augment, DataError
from train.strategy import STRATEGIES
from train.trainer import METHODS, NAT_SCOPES, SC_POOLS

FLAGS = flags.FLAGS
FINAL_EVALS = ("probe", "finetune", "none")

def define_flags() -> None:
    """Define the binary's flags (only when run as a program, so importing defines none)."""
    flags.DEFINE_enum("method", "nat", METHODS, "Pretraining method.")
    flags.DEFINE_enum("model", "nin_mnist", sorted(MODELS), "Network to pretrain.")
    flags.DEFINE_string("dataset", "digits", f"Pretraining images: one of {', '.join(DATASETS)}.")
    flags.DEFINE_string("data_dir", None, "tfds data directory.")
    flags.DEFINE_string("manual_dir", None, "tfds manual directory (ImageNet tars).")
    flags.DEFINE_string("model_dir", None, "Checkpoints, summaries, config.json "
                        "(default runs/<method>_<model>_<dataset>).")
    flags.DEFINE_string("input_shape", None, "H,W,C of the model input (default: the model's).")
    flags.DEFINE_string("preprocessing", None, "AlexNet front: sobel, gray, highpass or rgb.")
    flags.DEFINE_integer("batch_size", 128, "Global batch size (split over the replicas).")
    flags.DEFINE_integer("epochs", 15, "Epochs over the dataset.")
    flags.DEFINE_float("lr", 0.05, "Initial learning rate l0.")
    flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
    flags.DEFINE_float("weight_decay", 5e-4, "L2 penalty wd/2 ||W||^2 on the kernels.")
    flags.DEFINE_integer("lr_t0", 0, "Batches at constant lr before the decay l0/(1+g(t-t0)).")
    flags.DEFINE_float("lr_gamma", 0.0, "gamma of the decay l0/(1+gamma(t-t0)); 0 = constant.")
    flags.DEFINE_integer("plateau_patience", 0, "Epochs without loss improvement before the lr is "
                         "cut by --plateau_factor (0 = never).")
    flags.DEFINE_float("plateau_factor", 0.1, "Learning-rate cut on a plateau.")
    flags.DEFINE_integer("nat_dim", 64, "NAT target dimension d.")
    flags.DEFINE_integer("nat_reassign_every", 3, "Re-assign targets every k epochs (0 = fixed P).")
    flags.DEFINE_enum("nat_scope", "replica", NAT_SCOPES,
                      "Hungarian problem per replica or global.")
    flags.DEFINE_string("sc_endpoints", "sc:1", "SC endpoints with weights, 'name:w,name:w'.")
    flags.DEFINE_string("sc_patch", "0.3", "SC window: a fraction of the map area, or HxW cells.")
    flags.DEFINE_boolean("sc_squared", False, "SC on squared L2 distances.")
    flags.DEFINE_boolean("sc_symmetric", True, "Average SC with its transposed form.")
    flags.DEFINE_enum("sc_pool", "flatten", SC_POOLS, "How an SC window becomes a vector.")
    flags.DEFINE_enum("crop", "pad", CROPS, "Random crop: pad-and-crop, resized crop or none.")
    flags.DEFINE_integer("crop_pad", 2, "Padding (pixels) of --crop=pad.")
    flags.DEFINE_float("crop_min_scale", 0.35, "Smallest area fraction of --crop=resize.")
    flags.DEFINE_boolean("flip", False, "Random horizontal flips.")
    flags.DEFINE_enum("strategy", "auto", STRATEGIES, "tf.distribute strategy.")
    flags.DEFINE_integer("cpu_replicas", 1, "Split the CPU into N logical devices (testing).")
    flags.DEFINE_integer("steps_per_loop", 10, "Steps per tf.function call.")
    flags.DEFINE_integer("checkpoint_every", 100, "Steps between checkpoints (also at epoch ends).")
    flags.DEFINE_integer("seed", 0, "Seed of the targets, the data order and the augmentation.")
    flags.DEFINE_string("init_checkpoint", None, "Backbone weights to start from (no resume).")
    flags.DEFINE_string("export_dir", None, "SavedModel base directory "
                        "(default <model_dir>/export; 'none' skips the export).")
    flags.DEFINE_integer("probe_every_epochs", 5, "Linear probe every k epochs (0 = never).")
    flags.DEFINE_string("probe_dataset", None,
                        "Labelled dataset of the probes (default: --dataset).")
    flags.DEFINE_integer("probe_labels_per_class", 10, "Labels per class of the probes.")
    flags.DEFINE_integer("probe_splits", 5, "Label draws of the probes.")
    flags.DEFINE_enum("final_eval", "probe", FINAL_EVALS, "Final table: probe, finetune or none.")
    flags.DEFINE_integer("inject_nan_at_step", -1, "Testing aid: make the loss of that step NaN.")

    for _name in ("batch_size", "epochs", "nat_dim", "steps_per_loop", "checkpoint_every",
                  "cpu_replicas", "probe_splits", "probe_labels_per_class"):
        flags.register_validator(_name, lambda v: v >= 1, message=f"--{_name} must be >= 1")
    for _name in ("lr_t0", "nat_reassign_every", "plateau_patience", "probe_every_epochs",
                  "crop_pad"):
        flags.register_validator(_name, lambda v: v >= 0, message=f"--{_name} must be >= 0")
    flags.register_validator("lr", lambda v: v > 0, message="--lr must be > 0")
    for _name in ("momentum", "weight_decay", "lr_gamma"):
        flags.register_validator(_name, lambda v: v >= 0, message=f"--{_name} must be >= 0")
    flags.register_validator("plateau_factor", lambda v: 0 < v < 1,
                             message="--plateau_factor must be in (0, 1)")
    flags.register_validator("crop_min_scale", lambda v: 0 < v <= 1,
                             message="--crop_min_scale must be in (0, 1]")
    flags.register_validator(
        "dataset", lambda v: v in DATASETS or v.startswith("folder:"),
        message=f"--dataset must be one of {', '.join(DATASETS)}")


class UsageError(ValueError):
    """A flag value that cannot be used; the message names the flag."""


def parse_sc_endpoints(text: str) -> tuple[tuple[str, float], ...]:
    """'sc:1,block1:0.5' -> (("sc", 1.0), ("block1", 0.5)); a bare name has weight 1."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, weight = item.partition(":")
        try:
            out.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise UsageError(f"--sc_endpoints: bad weight in {item!r}") from None
    if not out:
        raise UsageError("--sc_endpoints names no endpoint")
    return tuple(out)


def parse_sc_patch(text: str) -> float | tuple[int, int]:
    """'0.3' (fraction of the map area) or '3x3' (cells)."""
    try:
        if "x" in text:
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
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError
        return shape
    except ValueError:
        raise UsageError(f"--input_shape={text!r}: expected H,W,C") from None


def config_from_flags():
    """The frozen TrainConfig of the parsed flags."""
    from train.trainer import TrainConfig

    model_dir = FLAGS.model_dir or os.path.join(
        "runs", f"{FLAGS.method}_{FLAGS.model}_{FLAGS.dataset.replace(':', '_').replace('/', '_')}")
    if FLAGS.preprocessing is not None and FLAGS.model != "alexnet":
        raise UsageError("--preprocessing applies to --model=alexnet only")
    return TrainConfig(
        model_dir=model_dir, method=FLAGS.method, model=FLAGS.model,
        input_shape=parse_input_shape(FLAGS.input_shape), preprocessing=FLAGS.preprocessing,
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
        batch_size=FLAGS.batch_size, epochs=FLAGS.epochs, lr=FLAGS.lr, momentum=FLAGS.momentum,
        weight_decay=FLAGS.weight_decay, lr_t0=FLAGS.lr_t0, lr_gamma=FLAGS.lr_gamma,
        plateau_patience=FLAGS.plateau_patience, plateau_factor=FLAGS.plateau_factor,
        nat_dim=FLAGS.nat_dim, nat_reassign_every=FLAGS.nat_reassign_every,
        nat_scope=FLAGS.nat_scope, sc_endpoints=parse_sc_endpoints(FLAGS.sc_endpoints),
        sc_patch=parse_sc_patch(FLAGS.sc_patch), sc_squared=FLAGS.sc_squared,
        sc_symmetric=FLAGS.sc_symmetric, sc_pool=FLAGS.sc_pool,
        augment=Augment(crop=FLAGS.crop, pad=FLAGS.crop_pad, min_scale=FLAGS.crop_min_scale,
                        flip=FLAGS.flip),
        steps_per_loop=FLAGS.steps_per_loop, checkpoint_every=FLAGS.checkpoint_every,
        seed=FLAGS.seed, init_checkpoint=FLAGS.init_checkpoint,
        probe_every_epochs=FLAGS.probe_every_epochs, probe_dataset=FLAGS.probe_dataset,
        probe_labels_per_class=FLAGS.probe_labels_per_class, probe_splits=FLAGS.probe_splits,
        inject_nan_at_step=FLAGS.inject_nan_at_step)


def plot_probe_history(history: list[tuple[int, float]], path: str) -> None:
    """Probe accuracy against epoch, as in NAT Figure 2 (left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs, accuracy = zip(*history, strict=True)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.plot(epochs, [100 * a for a in accuracy], marker="o")
    ax.set_xlabel("pretraining epoch")
    ax.set_ylabel("probe accuracy (%)")
    ax.set_title("Linear probe on frozen features")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def final_table(trainer, mode: str) -> list[dict]:
    """Rows comparing the pretrained network with the same network at random init."""
    from models import TRANSFER_ENDPOINT, build_model

    cfg = trainer.config
    dataset = trainer.probe_dataset()
    if mode == "none" or dataset is None:
        return []
    endpoint = TRANSFER_ENDPOINT[cfg.model]
    if mode == "probe":
        import keras

        keras.utils.set_random_seed(cfg.seed)  # the very init the pretraining started from
        random_model = build_model(cfg.model, **cfg.model_kwargs())
        what = (f"linear probe on {endpoint}, {cfg.probe_labels_per_class} labels/class, "
                f"{cfg.probe_splits} splits")
        rows = []
        for init, model in ((f"{cfg.method} pretrained", trainer.model),
                            ("random", random_model)):
            result = trainer.run_probe_result(model)
            rows.append({"init": init, "protocol": what, "accuracy": result.mean,
                         "std": result.std})
        return rows
    from evaluation import finetune

    ft_config = finetune.FinetuneConfig(
        init=cfg.model_dir, model=None, model_kwargs={}, dataset=dataset, data_dir=cfg.data_dir,
        manual_dir=cfg.manual_dir, stl10_dir=None, labels_per_class=cfg.probe_labels_per_class,
        # The fine-tuning binary's defaults, with room to converge on few labels.
        seeds=tuple(range(cfg.probe_splits)), compare_scratch=True, learning_rate=0.01,
        momentum=0.9, weight_decay=5e-4, batch_size=128, epochs=300, patience=10, max_cuts=3,
        translate=None, mirror=finetune.MIRROR[dataset], val_fraction=0.1, max_test_examples=0,
        output_dir=os.path.join(cfg.model_dir, "finetune"))
    results, _ = finetune.run(ft_config)
    what = (f"fine-tuned, {cfg.probe_labels_per_class} labels/class, "
            f"{cfg.probe_splits} seeds")
    rows = []
    for key, runs in results.items():
        accuracy = [r.test_accuracy for r in runs]
        rows.append({"init": f"{cfg.method} pretrained" if key == "pretrained" else "random",
                     "protocol": what, "accuracy": float(np.mean(accuracy)),
                     "std": float(np.std(accuracy))})
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = [f"{'init':<20} {'accuracy':>9}  protocol", "-" * 72]
    for row in rows:
        std = f" ± {100 * row['std']:.1f}" if "std" in row else ""
        lines.append(f"{row['init']:<20} {100 * row['accuracy']:>8.1f}%{std}  {row['protocol']}")
    return "\n".join(lines)


def run(config, strategy) -> dict:
    """Train, probe, export and report; returns the summary written to results.json."""
    from train.trainer import Trainer, write_config

    write_config(config)
    trainer = Trainer(config, strategy)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    if trainer.chief and trainer.probe_history:
        plot_probe_history(trainer.probe_history, os.path.join(config.model_dir, "probe.png"))
    export_base = FLAGS.export_dir or os.path.join(config.model_dir, "export")
    if export_base != "none":
        from train.export import export_features

        summary["export"] = export_features(
            trainer.model, export_base, config.model,
            metadata={"checkpoint": trainer.manager.latest_checkpoint, "method": config.method})
    rows = final_table(trainer, FLAGS.final_eval) if trainer.chief else []
    summary["final"] = rows
    if trainer.chief:
        with open(os.path.join(config.model_dir, "results.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        if rows:
            print("\n" + format_table(rows))
    return summary


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import tensorflow as tf

    from train.strategy import make_strategy
    from train.trainer import NonFiniteLoss

    logging.set_verbosity(logging.WARNING)  # keep the console to the progress bar and tables
    tf.get_logger().setLevel("ERROR")

    try:
        config = config_from_flags()
        strategy = make_strategy(FLAGS.strategy, FLAGS.cpu_replicas)
        run(config, strategy)
    except (UsageError, DataError, ValueError, FileNotFoundError, NonFiniteLoss) as exc:
        if os.environ.get("PRETRAIN_TRACEBACK"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
