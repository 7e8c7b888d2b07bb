r"""Unsupervised pretraining by Noise As Targets (NAT) or Spatial Contrasting (SC).

    python -m train.pretrain                                   # NAT, nin_mnist, embedded digits
    python -m train.pretrain --flagfile=train/configs/sc_digits.flags
    python -m train.pretrain --flagfile=train/configs/nat_alexnet_imagenet.flags \
        --data_dir=/data/tfds --manual_dir=/data/imagenet --model_dir=runs/nat_alexnet

Protocol (train/trainer.py): the model is trained without labels on the dataset's images;
checkpoints go to --model_dir every --checkpoint_every steps and at each epoch end, and a
rerun with the same --model_dir resumes. Every --probe_every_epochs epochs a linear probe
measures the frozen features (NAT Figure 2). At the end the feature extractor is exported as a
SavedModel (serving/export.py) and the final table compares the pretrained network with the
same network at random init: a linear probe (--final_eval=probe) or whole-network fine-tuning
with labels (--final_eval=finetune, the SC protocol).

The run folder belongs to one process and one set of settings (models/runs.py): a second
process on it, or a restart with a setting that changes the result (train/config.py lists
those a restart may change, e.g. --epochs), stops at once with one line and writes nothing.
probe_history.json, probe.png and results.json are rebuilt from everything the run recorded
(train/records.py); rerunning a finished run retrains and re-exports nothing and reprints its
table from results.json.

This module is the composition root: it builds the strategy, the trainer with its probe hook,
the export and the final table. Bad flags and every failure the user can act on stop with
one line and exit status 1 (models/cli.py); `--help` and `--helpfull` exit 0.
"""

from __future__ import annotations

import os

from models import cli
from train.config import TrainConfig

PROGRAM = "train.pretrain"


class ProbeHook:
    """The periodic linear probe of the trained network (NAT Figure 2), as an epoch-end hook.

    Every `every` epochs (on the chief) it probes the transfer endpoint, logs the accuracy as
    the summary "probe/accuracy" and records it in `<model_dir>/probe_history.json`;
    `history` [(epochs done, accuracy)] is the whole history, earlier processes' included.
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
        from train.records import record_probe

        self.history = record_probe(self.config.model_dir, epochs_done, accuracy)
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
    import dataclasses

    import numpy as np

    from evaluation import finetune

    ft_config = dataclasses.replace(
        finetune.FinetuneConfig(), init=config.model_dir, dataset=dataset,
        data_dir=config.data_dir, manual_dir=config.manual_dir,
        labels_per_class=config.probe_labels_per_class,
        seeds=tuple(range(config.probe_splits)), compare_scratch=True, epochs=300, patience=10,
        output_dir=os.path.join(config.model_dir, "finetune"))
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
    """Train, probe, export and report; returns the summary written to results.json. A rerun
    of a finished run returns its results.json and reprints its table (module docstring)."""
    from train import records
    from train.strategy import make_strategy
    from train.trainer import Trainer

    strategy = strategy or make_strategy(config.strategy, config.cpu_replicas)
    dataset = probe_dataset(config)
    hook = ProbeHook(config, dataset) if dataset is not None else None
    trainer = Trainer(config, strategy, hooks=[hook] if hook else [])
    start = trainer.step
    try:
        if trainer.chief:
            _clean_export_staging(config, trainer.log)
        summary = trainer.train()
    finally:
        trainer.close()
    if not trainer.chief:
        return summary
    finished = records.finished_results(config.model_dir, start) if summary["steps"] == start \
        else None
    if finished is not None:
        trainer.log(f"the run finished at step {start}: results from {records.RESULTS}, "
                    "nothing retrained or exported")
        records.write_probe_plot(config.model_dir, finished.get("probe_history", []),
                                 plot_probe_history)
        if finished.get("final"):
            print("\n" + format_table(finished["final"]))
        return finished
    return _report(config, trainer, summary)


def _export_base(config: TrainConfig) -> str:
    return config.export_dir or os.path.join(config.model_dir, "export")


def _clean_export_staging(config: TrainConfig, log) -> None:
    """Remove the export staging folders a dead process of this run left."""
    if _export_base(config) != "none":
        from serving.export import clean_staging

        clean_staging(os.path.join(_export_base(config), config.model), log)


def _report(config: TrainConfig, trainer, summary: dict) -> dict:
    """The chief's end of a run: probe plot, export, final table, results.json."""
    from train import records

    summary["probe_history"] = records.probe_history(config.model_dir, summary["epochs"])
    records.write_probe_plot(config.model_dir, summary["probe_history"], plot_probe_history)
    if _export_base(config) != "none":
        from serving.export import export_features

        summary["export"] = export_features(
            trainer.model, _export_base(config), config.model,
            metadata={"checkpoint": trainer.manager.latest_checkpoint, "method": config.method,
                      "model_kwargs": config.model_kwargs()}, log=trainer.log)
    rows = final_table(config, trainer.model)
    summary["final"] = rows
    records.write_results(config.model_dir, summary)
    if rows:
        print("\n" + format_table(rows))
    return summary


def main(argv=None) -> None:
    cli.main(PROGRAM, TrainConfig, run, module_name=PROGRAM, doc=__doc__, argv=argv)


if __name__ == "__main__":
    main()
