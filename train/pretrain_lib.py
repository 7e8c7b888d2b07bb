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
(--final_eval=finetune, the SC protocol). The frozen random init is read two ways, its BN
statistics at init and calibrated on the run's images (evaluation/random_init.py); both rows
are shown and each view's gap is taken against the stronger one, named in the table.

The run folder belongs to one process and one set of settings (runtime/ownership.py): a second
process on it, or a restart with a setting that changes the result (train/config.py lists
those a restart may change, e.g. --epochs), stops at once with one line and writes nothing.
probe_history.json, probe.png and results.json are rebuilt from everything the run recorded
(train/records.py); rerunning a finished run retrains and re-exports nothing and reprints its
table from results.json.

This module is the composition root: it builds the strategy, the trainer with its probe hook,
the export and the final table. Bad flags and every failure the user can act on stop with
one line and exit status 1 (runtime/cli.py); `--help` and `--helpfull` exit 0.
"""

from __future__ import annotations

import os

from runtime import cli
from train.config import TrainConfig

PROGRAM = "train.pretrain"


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

    def __call__(self, trainer, epochs_done: int) -> None:
        import tensorflow as tf

        every = self.config.probe_every_epochs
        if every <= 0 or epochs_done % every or not trainer.chief:
            return
        result = probe_result(self.config, trainer.model, self.dataset)
        entry = (epochs_done, result.mean, [float(a) for a in result.accuracies])
        with trainer.writer.as_default(step=trainer.step):
            tf.summary.scalar("probe/accuracy", result.mean)
        from train.records import record_probe

        self.history = record_probe(self.config.model_dir, entry)
        trainer.log(f"epoch {epochs_done}: linear probe {100 * result.mean:.1f}% "
                    f"± {100 * result.std:.1f} (sd over {len(result.accuracies)} label draws)")


def probe_dataset(config: TrainConfig) -> str | None:
    """The labelled dataset of the probes, or None when there is none."""
    from data import LABELLED_DATASETS

    name = config.probe_dataset or config.dataset
    return name if name in LABELLED_DATASETS else None


def probe_source(config: TrainConfig, dataset: str):
    """The labelled `dataset` where the run reads its data (--data_dir, --manual_dir)."""
    from data.labelled import LabelledSource

    return LabelledSource(dataset, config.data_dir, config.manual_dir)


def check_probe_data(config: TrainConfig) -> None:
    """DataError, before any training, when the labelled data the probes or the final table
    will read is not prepared (data.labelled.check_available)."""
    dataset = probe_dataset(config)
    if dataset is not None and (config.probe_every_epochs > 0 or config.final_eval != "none"):
        from data.labelled import check_available

        check_available(probe_source(config, dataset))


def probe_result(config: TrainConfig, model, dataset: str):
    """The linear probe of `model` at its transfer endpoint (evaluation.probe.EndpointResult)."""
    from evaluation.probe import run_probe
    from models import TRANSFER_ENDPOINT

    result = run_probe(model, [TRANSFER_ENDPOINT[config.model]], probe_source(config, dataset),
                       config.probe_labels_per_class, config.probe_splits, seed=config.seed)
    return result.endpoints[0]


def random_twin(config: TrainConfig):
    """The network the pretraining started from: the same architecture and seeded init."""
    import keras

    from models import build_model

    keras.utils.set_random_seed(config.seed)
    return build_model(config.model, **config.model_kwargs())


def calibrated_twin(config: TrainConfig):
    """The random twin with its BN statistics calibrated on the run's pretraining images
    (evaluation/random_init.py): the second random-init row of every comparison."""
    from evaluation.random_init import calibrated, pretraining_images
    from train.records import recorded_images

    twin = random_twin(config)
    images = pretraining_images(config.dataset, twin.input_shape[1:], config.data_dir,
                                config.manual_dir, recorded_images(config.model_dir))
    return calibrated(twin, images)


def _probe_table(config: TrainConfig, model, dataset: str) -> tuple[dict, str]:
    from evaluation.compare import compare
    from models import TRANSFER_ENDPOINT

    views = {"linear": TRANSFER_ENDPOINT[config.model]}
    if "embedding" in model.output:
        views["knn"] = "embedding"
    comparison = compare(model, random_twin(config), probe_source(config, dataset), views,
                         config.probe_labels_per_class, config.probe_splits, config.seed,
                         config.method, calibrated=calibrated_twin(config))
    return {"probe": comparison.to_json()}, comparison.table()


def _finetune_table(config: TrainConfig, dataset: str) -> tuple[dict, str]:
    from evaluation import finetune

    # The fine-tuning binary's own defaults: `python -m evaluation.finetune --init=<run>
    # --compare_scratch --seeds=...` reproduces this table.
    ft_config = finetune.FinetuneConfig(
        init=config.model_dir, dataset=dataset, data_dir=config.data_dir,
        manual_dir=config.manual_dir, labels_per_class=config.probe_labels_per_class,
        seeds=tuple(range(config.probe_splits)), compare_scratch=True,
        output_dir=os.path.join(config.model_dir, "finetune"),
        mixed_precision=config.mixed_precision)
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
    """Train, probe, export and report; returns the summary written to results.json. A rerun
    of a finished run returns its results.json and reprints its table (module docstring)."""
    from train import records
    from train.strategy import make_strategy
    from train.trainer import Trainer

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
        from serving.export import clean_staging

        clean_staging(os.path.join(_export_base(config), config.model), log)


def _plot(config: TrainConfig, history: list, figures: dict) -> None:
    """probe.png from the whole probe history and the final table's baselines (replaced only
    when it changes)."""
    from evaluation.figures import plot_probe_curve
    from train import records

    records.write_probe_plot(config.model_dir, history, lambda h, path: plot_probe_curve(
        h, figures.get("probe"), path, f"{config.method} on {config.dataset}, {config.model}"))


def _report(config: TrainConfig, trainer, summary: dict) -> dict:
    """The chief's end of a run: export, final table, probe plot, results.json."""
    from train import records

    summary["probe_history"] = records.probe_history(config.model_dir, summary["epochs"])
    model = trainer.model
    if config.mixed_precision != "none":
        # The export and the final table use the network in float32, as a rebuild from the
        # run folder (serving.export) does: served features do not depend on the training
        # precision, and the random-init row is float32 too.
        from models.precision import float32_copy

        model = float32_copy(model, config.model, **config.model_kwargs())
    if _export_base(config) != "none":
        from serving.export import export_features

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


def main(argv=None) -> None:
    cli.main(PROGRAM, TrainConfig, run, module_name=PROGRAM, doc=__doc__, argv=argv)


if __name__ == "__main__":
    main()
