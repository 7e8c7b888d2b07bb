"""`run` of `python -m train.pretrain`, whose docstring states the protocol."""

from __future__ import annotations

import os
from collections.abc import Callable

import keras
import tensorflow as tf

from data import LABELLED_DATASETS
from data.labelled import LabelledSource, check_available
from evaluation import finetune, finetune_lib
from evaluation.compare import compare
from evaluation.figures import plot_probe_curve
from evaluation.probe import run_probe
from evaluation.random_init import calibrated, pretraining_images
from models import TRANSFER_ENDPOINT, build_model
from models.precision import float32_copy
from serving.export_lib import clean_staging, export_features
from train import records
from train.config import TrainConfig
from train.records import record_probe, recorded_images
from train.strategy import make_strategy
from train.trainer import Trainer


class ProbeHook:
    """The periodic linear probe of the trained network (NAT Figure 2), as an epoch-end hook.

    Every `probe_every_epochs` epochs (on the chief) it probes the transfer endpoint on the
    final table's label draws, logs the mean accuracy as the summary "probe/accuracy", and
    records (epochs done, mean accuracy, accuracy of every draw) in
    `<model_dir>/probe_history.json`; `history` is that whole history, earlier processes'
    included.
    """

    def __init__(self, config: TrainConfig, dataset: str):
        self.config = config
        self.dataset = dataset
        self.history: list[tuple[int, float, list[float]]] = []

    def __call__(self, model, epochs_done: int, step: int, writer, log: Callable[[str], None],
                 chief: bool) -> None:
        """The trainer's epoch-end call (train/trainer.py): the trained `model`, the epochs
        done, the global `step`, the summary `writer`, the `log` of messages and whether this
        worker is the `chief` (only the chief probes)."""
        every = self.config.probe_every_epochs
        if every <= 0 or epochs_done % every or not chief:
            return
        result = probe_result(self.config, model, self.dataset)
        entry = (epochs_done, result.mean, [float(a) for a in result.accuracies])
        with writer.as_default(step=step):
            tf.summary.scalar("probe/accuracy", result.mean)
        self.history = record_probe(self.config.model_dir, entry)
        log(f"epoch {epochs_done}: linear probe {100 * result.mean:.1f}% "
                    f"± {100 * result.std:.1f} (sd over {len(result.accuracies)} label draws)")


def probe_dataset(config: TrainConfig) -> str | None:
    """The labelled dataset of the probes, or None when there is none."""
    name = config.probe_dataset or config.dataset
    return name if name in LABELLED_DATASETS else None


def probe_source(config: TrainConfig, dataset: str):
    """The labelled `dataset` where the run reads its data (--data_dir, --manual_dir)."""

    return LabelledSource(dataset, config.data_dir, config.manual_dir)


def check_probe_data(config: TrainConfig) -> None:
    """DataError, before any training, when the labelled data the probes or the final table
    will read is not prepared (data.labelled.check_available)."""
    dataset = probe_dataset(config)
    if dataset is not None and (config.probe_every_epochs > 0 or config.final_eval != "none"):

        check_available(probe_source(config, dataset))


def probe_result(config: TrainConfig, model, dataset: str):
    """The linear probe of `model` at its transfer endpoint (evaluation.probe.EndpointResult)."""

    result = run_probe(model, [TRANSFER_ENDPOINT[config.model]], probe_source(config, dataset),
                       config.probe_labels_per_class, config.probe_splits, seed=config.seed)
    return result.endpoints[0]


def random_twin(config: TrainConfig):
    """The network the pretraining started from: the same architecture and seeded init."""
    keras.utils.set_random_seed(config.seed)
    return build_model(config.model, **config.model_kwargs())


def calibrated_twin(config: TrainConfig):
    """The random twin with its BN statistics calibrated on the run's pretraining images
    (evaluation/random_init.py): the second random-init row of every comparison."""

    twin = random_twin(config)
    images = pretraining_images(config.dataset, twin.input_shape[1:], config.data_dir,
                                config.manual_dir, recorded_images(config.model_dir))
    return calibrated(twin, images)


def _probe_table(config: TrainConfig, model, dataset: str) -> tuple[dict, str]:
    views = {"linear": TRANSFER_ENDPOINT[config.model]}
    if "embedding" in model.output:
        views["knn"] = "embedding"
    comparison = compare(model, random_twin(config), probe_source(config, dataset), views,
                         config.probe_labels_per_class, config.probe_splits, config.seed,
                         config.method, calibrated=calibrated_twin(config))
    return {"probe": comparison.to_json()}, comparison.table()


def _finetune_table(config: TrainConfig, dataset: str) -> tuple[dict, str]:
    # The fine-tuning binary's own defaults: `python -m evaluation.finetune --pretrained=<run>
    # --compare_scratch --seeds=...` reproduces this table.
    ft_config = finetune.FinetuneConfig(
        pretrained=config.model_dir, dataset=dataset, data_dir=config.data_dir,
        manual_dir=config.manual_dir, labels_per_class=config.probe_labels_per_class,
        seeds=tuple(range(config.probe_splits)), compare_scratch=True,
        output_dir=os.path.join(config.model_dir, "finetune"),
        mixed_precision=config.mixed_precision)
    results, text = finetune_lib.run(ft_config)
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
    """Train, probe, export and report; returns the summary written to results.json. A rerun
    of a finished run returns its results.json and reprints its table (module docstring)."""

    check_probe_data(config)  # before the run folder is touched or a step is trained
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
        _plot(config, finished.get("probe_history", []), finished.get("final", {}))
        if finished.get("final_table"):
            print("\n" + finished["final_table"])
        return finished
    return _report(config, trainer, summary)


def _export_base(config: TrainConfig) -> str:
    return config.export_dir or os.path.join(config.model_dir, "export")


def _clean_export_staging(config: TrainConfig, log) -> None:
    """Remove the export staging folders a dead process of this run left."""
    if _export_base(config) != "none":
        clean_staging(os.path.join(_export_base(config), config.model), log)


def _plot(config: TrainConfig, history: list, figures: dict) -> None:
    """probe.png from the whole probe history and the final table's baselines (replaced only
    when it changes)."""
    records.write_probe_plot(config.model_dir, history, lambda h, path: plot_probe_curve(
        h, figures.get("probe"), path, f"{config.method} on {config.dataset}, {config.model}"))


def _report(config: TrainConfig, trainer, summary: dict) -> dict:
    """The chief's end of a run: export, final table, probe plot, results.json."""
    summary["probe_history"] = records.probe_history(config.model_dir, summary["epochs"])
    model = trainer.model
    if config.mixed_precision != "none":
        # The export and the final table use the network in float32, as a rebuild from the
        # run folder (serving.export) does: served features do not depend on the training
        # precision, and the random-init row is float32 too.
        model = float32_copy(model, config.model, **config.model_kwargs())
    if _export_base(config) != "none":
        summary["export"] = export_features(
            model, _export_base(config), config.model,
            metadata={"checkpoint": trainer.manager.latest_checkpoint, "method": config.method,
                      "model_kwargs": config.model_kwargs(),
                      "mixed_precision": config.mixed_precision}, log=trainer.log)
    figures, text = final_table(config, model)
    summary["final"], summary["final_table"] = figures, text
    _plot(config, summary["probe_history"], figures)
    records.write_results(config.model_dir, summary)
    if text:
        print("\n" + text)
    print(f"\nwrote {config.model_dir}: checkpoints, config.json, results.json, "
          "TensorBoard summaries (train/)" + (", probe.png" if summary["probe_history"] else "")
          + (f", the SavedModel {summary['export']}" if summary.get("export") else ""))
    return summary

