r"""Unsupervised pretraining by Noise As Targets (NAT) or Spatial Contrasting (SC).

    python -m train.pretrain                                   # NAT, nin_mnist, embedded digits
    python -m train.pretrain --flagfile=train/configs/sc_digits.flags
    python -m train.pretrain --flagfile=train/configs/nat_alexnet_imagenet.flags \
        --data_dir=/data/tfds --manual_dir=/data/imagenet --model_dir=runs/nat_alexnet \
        --mixed_precision=bf16 --jit_compile                  # on one GPU

Protocol (train/trainer.py): the model is trained without labels on the dataset's images;
checkpoints go to --model_dir every --checkpoint_every steps and at each epoch end, and a
rerun with the same --model_dir resumes. Every --probe_every_epochs epochs a linear probe
measures the frozen features (NAT Figure 2). At the end the feature extractor is exported as a
SavedModel (serving/export.py), in float32 whatever --mixed_precision the network trained in,
and the final table compares the pretrained network with the same network at random init: a
linear probe (--final_eval=probe) or whole-network fine-tuning with labels
(--final_eval=finetune, the SC protocol).

This module is the composition root: it builds the strategy, the trainer with its probe hook,
the export and the final table. Bad flags stop with one line and exit status 1.
"""

from __future__ import annotations

import json
import os

from models import cli
from train.config import TrainConfig

PROGRAM = "train.pretrain"


class ProbeHook:
    """The periodic linear probe of the trained network (NAT Figure 2), as an epoch-end hook.

    Every `every` epochs (on the chief) it probes the transfer endpoint, logs the accuracy as
    the summary "probe/accuracy", and keeps `history` [(epochs done, accuracy)], also written
    to `<model_dir>/probe_history.json` (entries of earlier processes are kept).
    """

    def __init__(self, config: TrainConfig, dataset: str):
        self.config = config
        self.dataset = dataset
        self.history: list[tuple[int, float]] = []

    def __call__(self, trainer, epochs_done: int) -> None:
        import tensorflow as tf

        every = self.config.probe_every_epochs
        if every <= 0 or epochs_done % every or not trainer.chief:
            return
        accuracy = probe_result(self.config, trainer.model, self.dataset).mean
        self.history.append((epochs_done, accuracy))
        with trainer.writer.as_default(step=trainer.step):
            tf.summary.scalar("probe/accuracy", accuracy)
        path = os.path.join(self.config.model_dir, "probe_history.json")
        previous = []
        if os.path.exists(path):
            with open(path) as f:
                previous = [tuple(p) for p in json.load(f) if p[0] < epochs_done]
        from models.runs import write_json_atomic

        write_json_atomic(path, [*previous, (epochs_done, accuracy)])
        trainer.log(f"\nepoch {epochs_done}: probe accuracy {100 * accuracy:.1f}%")


def probe_dataset(config: TrainConfig) -> str | None:
    """The labelled dataset of the probes, or None when there is none."""
    from data import LABELLED_DATASETS

    name = config.probe_dataset or config.dataset
    return name if name in LABELLED_DATASETS else None


def probe_result(config: TrainConfig, model, dataset: str):
    """The linear probe of `model` at its transfer endpoint (evaluation.probe.EndpointResult)."""
    from evaluation.probe import run_probe
    from models import TRANSFER_ENDPOINT

    result = run_probe(model, [TRANSFER_ENDPOINT[config.model]], dataset,
                       config.probe_labels_per_class, config.probe_splits, seed=config.seed)
    return result.endpoints[0]


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


def _probe_rows(config: TrainConfig, model, dataset: str) -> list[dict]:
    import keras

    from models import TRANSFER_ENDPOINT, build_model

    keras.utils.set_random_seed(config.seed)  # the very init the pretraining started from
    random_model = build_model(config.model, **config.model_kwargs())
    what = (f"linear probe on {TRANSFER_ENDPOINT[config.model]}, "
            f"{config.probe_labels_per_class} labels/class, {config.probe_splits} splits")
    rows = []
    for init, net in ((f"{config.method} pretrained", model), ("random", random_model)):
        result = probe_result(config, net, dataset)
        rows.append({"init": init, "protocol": what, "accuracy": result.mean,
                     "std": result.std})
    return rows


def _finetune_rows(config: TrainConfig, dataset: str) -> list[dict]:
    import numpy as np

    from evaluation import finetune

    # Built with --init given: the defaults alone are not a valid config (--init is required).
    ft_config = finetune.FinetuneConfig(
        init=config.model_dir, dataset=dataset,
        data_dir=config.data_dir, manual_dir=config.manual_dir,
        labels_per_class=config.probe_labels_per_class,
        seeds=tuple(range(config.probe_splits)), compare_scratch=True, epochs=300, patience=10,
        output_dir=os.path.join(config.model_dir, "finetune"),
        mixed_precision=config.mixed_precision)
    results, _ = finetune.run(ft_config)
    what = (f"fine-tuned, {config.probe_labels_per_class} labels/class, "
            f"{config.probe_splits} seeds")
    rows = []
    for key, runs in results.items():
        accuracy = [r.test_accuracy for r in runs]
        rows.append({"init": f"{config.method} pretrained" if key == "pretrained" else "random",
                     "protocol": what, "accuracy": float(np.mean(accuracy)),
                     "std": float(np.std(accuracy))})
    return rows


def final_table(config: TrainConfig, model) -> list[dict]:
    """Rows comparing the pretrained network with the same network at random init."""
    dataset = probe_dataset(config)
    if config.final_eval == "none" or dataset is None:
        return []
    if config.final_eval == "probe":
        return _probe_rows(config, model, dataset)
    return _finetune_rows(config, dataset)


def format_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = [f"{'init':<20} {'accuracy':>9}  protocol", "-" * 72]
    for row in rows:
        std = f" ± {100 * row['std']:.1f}" if "std" in row else ""
        lines.append(f"{row['init']:<20} {100 * row['accuracy']:>8.1f}%{std}  {row['protocol']}")
    return "\n".join(lines)


def run(config: TrainConfig, strategy=None) -> dict:
    """Train, probe, export and report; returns the summary written to results.json."""
    from models.runs import write_json_atomic
    from train.strategy import make_strategy
    from train.trainer import Trainer, write_run_config

    strategy = strategy or make_strategy(config.strategy, config.cpu_replicas)
    write_run_config(config)
    dataset = probe_dataset(config)
    hook = ProbeHook(config, dataset) if dataset is not None else None
    trainer = Trainer(config, strategy, hooks=[hook] if hook else [])
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    summary["probe_history"] = hook.history if hook else []
    if trainer.chief and summary["probe_history"]:
        plot_probe_history(summary["probe_history"], os.path.join(config.model_dir, "probe.png"))
    model = trainer.model
    if config.mixed_precision != "none":
        # The export and the final table use the network in float32, as a rebuild from the
        # run folder (serving.export) does: served features do not depend on the training
        # precision, and the random-init row is float32 too.
        from models.precision import float32_copy

        model = float32_copy(model, config.model, **config.model_kwargs())
    export_base = config.export_dir or os.path.join(config.model_dir, "export")
    if export_base != "none":
        from serving.export import export_features

        summary["export"] = export_features(
            model, export_base, config.model,
            metadata={"checkpoint": trainer.manager.latest_checkpoint, "method": config.method,
                      "mixed_precision": config.mixed_precision})
    rows = final_table(config, model) if trainer.chief else []
    summary["final"] = rows
    if trainer.chief:
        write_json_atomic(os.path.join(config.model_dir, "results.json"), summary)
        if rows:
            print("\n" + format_table(rows))
    return summary


def main(argv=None) -> None:
    cli.main(PROGRAM, TrainConfig, run, module_name=PROGRAM, doc=__doc__, argv=argv)


if __name__ == "__main__":
    main()
