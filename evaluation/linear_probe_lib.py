"""`run` of `python -m evaluation.linear_probe`, whose docstring states the protocol."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, fields

from data import labelled
from evaluation import probe, report
from evaluation.classifiers import KnnHead, MLPHead
from evaluation.features import model_input_shape
from evaluation.linear_probe import ProbeConfig
from evaluation.random_init import MAX_CALIBRATION_IMAGES, calibrated, pretraining_images, stronger
from models import TRANSFER_ENDPOINT
from models.runs import load_run_model
from runtime.cli import UsageError
from runtime.ownership import claim_run, fingerprint_of, start_run
from runtime.run_config import read_config, run_folder
from serving.client import SavedModelClient, ServingError

AT_INIT, CALIBRATED = "random init, BN at init", "random init, BN calibrated"
# Flags younger than some output folders: left out of the fingerprint at their defaults, so
# that such a folder still belongs to the configuration that wrote it.
LATER_FLAGS = ("eval_split", "holdout_per_class", "knn_temperature")


def fingerprint(cfg: ProbeConfig) -> dict:
    """What makes an output folder this configuration's (runtime/ownership.py)."""
    defaults = {f.name: f.default for f in fields(cfg) if f.name in LATER_FLAGS}
    return {key: value for key, value in fingerprint_of(cfg, cfg.RESUMABLE).items()
            if key not in defaults or value != defaults[key]}


def load_model(cfg: ProbeConfig):
    """(model, model name, a description of the weights, the checkpoint's {"path", "step"} or
    None) from the config: one checkpoint, read once (models/checkpoints.py)."""
    if cfg.saved_model:
        try:
            client = SavedModelClient(cfg.saved_model)
        except ServingError as error:
            raise UsageError(f"--saved_model={cfg.saved_model}: {error}") from None
        return client, None, cfg.saved_model, None
    try:
        loaded = load_run_model(cfg.pretrained, cfg.model, cfg.overrides(), init=cfg.init,
                                seed=cfg.seed)
    except (FileNotFoundError, ValueError) as error:
        flag = "--pretrained" if cfg.pretrained else "--model_kwargs"
        raise UsageError(f"{flag}={cfg.pretrained or cfg.model_kwargs}: {error}") from None
    weights = (f"random init, seed {loaded.seed}" if cfg.init == "random"
               else f"{loaded.checkpoint} ({loaded.loaded} tensors)")
    checkpoint = {"path": loaded.checkpoint, "step": loaded.step} if loaded.checkpoint else None
    return loaded.model, loaded.name, weights, checkpoint


def run(cfg: ProbeConfig):
    """Run the probe of `cfg`; write config.json, probe.json and probe.md; print and return
    (result, console table)."""
    with claim_run(cfg.out, fingerprint(cfg), "--output_dir") as claim:
        result, seconds, name, weights, checkpoint = _probe(cfg)
        # A random init is probed twice: BN at init (above) and BN calibrated.
        results = {"": result} if cfg.init == "pretrained" else {
            AT_INIT: result, CALIBRATED: _probe_calibrated(cfg)}
        start_run(claim, asdict(cfg))  # complete results: config.json, then them
    labels = cfg.labels_per_class or "all"
    headers = ["endpoint", "pooled", "dims", "head", "labels/class", "splits", "val acc %",
               "test acc %" if cfg.eval_split == "test" else "holdout acc %"]
    rows = []
    for init, each in results.items():
        for e in each.endpoints:
            val = [s.val_accuracy for s in e.splits if s.val_accuracy is not None]
            rows.append([e.endpoint, "x".join(map(str, e.shape)), str(e.dims), cfg.head,
                         str(labels), str(cfg.splits),
                         report.percent(*report.mean_std(val)) if val else "-",
                         report.percent(e.mean, e.std)] + ([init] if init else []))
    scored = (f"{result.test_examples} test images" if result.scored_split == "test" else
              f"validation holdout of {result.scored_examples} train images")
    title = (f"{_head(cfg)} probe of {name} ({weights}) on {cfg.dataset}: "
             f"{result.train_examples} train images drawn, {scored}")
    payload = {"config": asdict(cfg), "model": name, "weights": weights,
               "checkpoint": checkpoint, "seconds": seconds, **result.to_json()}
    notes = ""
    if len(results) > 1:
        headers.append("init")
        stronger = _stronger_rows(results)
        payload["random_inits"] = {init: each.to_json() for init, each in results.items()}
        payload["stronger"] = stronger
        notes = "".join(f"\n{endpoint}: the stronger random-init row is {init}"
                        for endpoint, init in stronger.items())
    table = report.write_report(cfg.out, "probe", payload, headers, rows, title)
    text = f"{title}\n{table}{notes}"
    print(text)
    print(f"wrote {cfg.out}/probe.md and probe.json")
    return result, text


def _head(cfg: ProbeConfig) -> str:
    """The head as the title names it: `knn (k=200, T=0.07)`, `knn (k=1, one vote each)`."""
    if cfg.head != "knn":
        return cfg.head
    votes = f"T={cfg.knn_temperature:g}" if cfg.knn_temperature else "one vote each"
    return f"knn (k={cfg.knn_k}, {votes})"


def _stronger_rows(results: dict) -> dict[str, str]:
    """{endpoint: the init whose mean accuracy is higher} over results {init: ProbeResult}."""

    endpoints = [e.endpoint for e in next(iter(results.values())).endpoints
                 if e.endpoint != "pixels"]  # the input: the same for both
    return {endpoint: stronger({init: next(e.accuracies for e in each.endpoints
                                           if e.endpoint == endpoint)
                                for init, each in results.items()})
            for endpoint in endpoints}


def calibration_images(cfg: ProbeConfig, input_shape):
    """The images a random init's BN statistics are calibrated on: the run's pretraining
    images (its config.json's dataset), or without a run the --dataset's train images."""

    folder = run_folder(cfg.pretrained) if cfg.pretrained else ""
    config = read_config(folder) if folder and os.path.exists(
        os.path.join(folder, "config.json")) else {}
    if "dataset" in config:
        listed = os.path.join(folder, "images.txt")  # a folder run's recorded files
        files = None
        if os.path.exists(listed):
            with open(listed) as f:
                files = f.read().splitlines()
        return pretraining_images(config["dataset"], input_shape, cfg.data_dir,
                                  cfg.manual_dir, files)
    source = labelled.LabelledSource(cfg.dataset, cfg.data_dir, cfg.manual_dir, cfg.stl10_dir)
    return labelled.load(source, "train", input_shape).take(MAX_CALIBRATION_IMAGES)


def _probe_calibrated(cfg: ProbeConfig):
    """The ProbeResult of the same seeded random init with its BN statistics calibrated."""

    loaded = load_model(cfg)
    calibrated(loaded[0], calibration_images(cfg, model_input_shape(loaded[0])))
    return _probe(cfg, loaded)[0]


def _probe(cfg: ProbeConfig, loaded=None):
    """(the ProbeResult, seconds, model name, a description of the weights, the checkpoint) of
    the model of `cfg` (or of `loaded`, `load_model`'s answer with the weights changed since)."""

    source = labelled.LabelledSource(cfg.dataset, cfg.data_dir, cfg.manual_dir, cfg.stl10_dir)
    if not cfg.stl10_folds:  # (the folds read the STL-10 binary folder, not tfds)
        # the splits it reads (a holdout: train only), before the model is loaded
        labelled.check_available(source, ("train",) if cfg.eval_split == "validation"
                                 else labelled.SPLITS)
    model, name, weights, checkpoint = loaded or load_model(cfg)
    endpoints = cfg.endpoints
    if endpoints is None:
        if name not in TRANSFER_ENDPOINT:
            raise UsageError("--endpoints is required for this model")
        endpoints = (TRANSFER_ENDPOINT[name],)
    try:
        probe.check_endpoints(model, endpoints)
    except ValueError as error:
        raise UsageError(f"--endpoints: {error}") from None
    tic = time.time()
    try:
        result = probe.run_probe(
            model, endpoints, source, cfg.labels_per_class, cfg.splits, seed=cfg.seed,
            stl10_folds=cfg.stl10_folds, max_test_examples=cfg.max_test_examples or None,
            head=cfg.head, pool=cfg.pool, pool_size=cfg.pool_size or None,
            max_dims=cfg.max_dims, val_fraction=cfg.val_fraction, batch_size=cfg.batch_size,
            mlp=MLPHead(width=cfg.mlp_width, epochs=cfg.mlp_epochs,
                        learning_rate=cfg.mlp_learning_rate),
            knn=KnnHead(k=cfg.knn_k, temperature=cfg.knn_temperature or None),
            evaluate_on=cfg.eval_split, holdout_per_class=cfg.holdout_per_class)
    except labelled.LabelsPerClassError as error:
        raise UsageError(f"--labels_per_class={cfg.labels_per_class}: {error}") from None
    except probe.HoldoutError as error:
        raise UsageError(f"--{error}") from None
    return result, time.time() - tic, name or model.name, weights, checkpoint
