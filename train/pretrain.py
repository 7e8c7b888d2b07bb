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

    Every `probe_every_epochs` epochs (on the chief) it probes the transfer endpoint on the
    final table's label draws, logs the mean accuracy as the summary "probe/accuracy", and keeps
    `history` [(epochs done, mean accuracy, accuracy of every draw)], also written to
    `<model_dir>/probe_history.json` (entries of earlier processes are kept).
    """

    def __init__(self, config: TrainConfig, dataset: str):
        self.config = config
        self.dataset = dataset
        self.history: list[tuple[int, float, list[float]]] = []

    def __call__(self, trainer, epochs_done: int) -> None:
        import tensorflow as tf

        from models.runs import write_json_atomic

        every = self.config.probe_every_epochs
        if every <= 0 or epochs_done % every or not trainer.chief:
            return
        result = probe_result(self.config, trainer.model, self.dataset)
        entry = (epochs_done, result.mean, [float(a) for a in result.accuracies])
        self.history.append(entry)
        with trainer.writer.as_default(step=trainer.step):
            tf.summary.scalar("probe/accuracy", result.mean)
        path = os.path.join(self.config.model_dir, "probe_history.json")
        previous = []
        if os.path.exists(path):
            with open(path) as f:
                previous = [tuple(p) for p in json.load(f) if p[0] < epochs_done]
        write_json_atomic(path, [*previous, entry])
        trainer.log(f"epoch {epochs_done}: linear probe {100 * result.mean:.1f}% "
                    f"± {100 * result.std:.1f} (sd over {len(result.accuracies)} label draws)")


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


def random_twin(config: TrainConfig):
    """The network the pretraining started from: the same architecture and seeded init."""
    import keras

    from models import build_model

    keras.utils.set_random_seed(config.seed)
    return build_model(config.model, **config.model_kwargs())


def _probe_table(config: TrainConfig, model, dataset: str) -> tuple[dict, str]:
    from evaluation.compare import compare
    from models import TRANSFER_ENDPOINT

    views = {"linear": TRANSFER_ENDPOINT[config.model]}
    if "embedding" in model.output:
        views["knn"] = "embedding"
    comparison = compare(model, random_twin(config), dataset, views,
                         config.probe_labels_per_class, config.probe_splits, config.seed,
                         config.method)
    return {"probe": comparison.to_json()}, comparison.table()


def _finetune_table(config: TrainConfig, dataset: str) -> tuple[dict, str]:
    from evaluation import finetune

    # The fine-tuning binary's own defaults: `python -m evaluation.finetune --init=<run>
    # --compare_scratch --seeds=...` reproduces this table.
    ft_config = finetune.FinetuneConfig(
        init=config.model_dir, dataset=dataset, data_dir=config.data_dir,
        manual_dir=config.manual_dir, labels_per_class=config.probe_labels_per_class,
        seeds=tuple(range(config.probe_splits)), compare_scratch=True,
        output_dir=os.path.join(config.model_dir, "finetune"))
    results, text = finetune.run(ft_config)
    summary = {key: [r.test_accuracy for r in runs] for key, runs in results.items()}
    return {"finetune": summary}, text


def final_table(config: TrainConfig, model) -> tuple[dict, str]:
    """The pretrained network against the same network at random init (and raw pixels):
    (the figures for results.json, the console text); ({}, "") without a labelled dataset.
    --final_eval=probe compares the frozen features; finetune adds whole-network fine-tuning
    against training from scratch (the SC protocol)."""
    dataset = probe_dataset(config)
    if config.final_eval == "none" or dataset is None:
        return {}, ""
    figures, text = _probe_table(config, model, dataset)
    if config.final_eval == "finetune":
        more, more_text = _finetune_table(config, dataset)
        figures, text = {**figures, **more}, f"{text}\n\n{more_text}"
    return figures, text


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
    export_base = config.export_dir or os.path.join(config.model_dir, "export")
    if export_base != "none":
        from serving.export import export_features

        summary["export"] = export_features(
            trainer.model, export_base, config.model,
            metadata={"checkpoint": trainer.manager.latest_checkpoint, "method": config.method})
    figures, text = final_table(config, trainer.model) if trainer.chief else ({}, "")
    summary["final"], summary["final_table"] = figures, text
    if trainer.chief:
        if summary["probe_history"]:
            from evaluation.figures import plot_probe_curve

            plot_probe_curve(summary["probe_history"], figures.get("probe"),
                             os.path.join(config.model_dir, "probe.png"),
                             f"{config.method} on {config.dataset}, {config.model}")
        write_json_atomic(os.path.join(config.model_dir, "results.json"), summary)
        if text:
            print("\n" + text)
        print(f"\nwrote {config.model_dir}: checkpoints, config.json, results.json, "
              "TensorBoard summaries (train/)" + (", probe.png" if summary["probe_history"]
                                                  else "")
              + (f", the SavedModel {summary['export']}" if summary.get("export") else ""))
    return summary


def main(argv=None) -> None:
    cli.main(PROGRAM, TrainConfig, run, module_name=PROGRAM, doc=__doc__, argv=argv)


if __name__ == "__main__":
    main()
