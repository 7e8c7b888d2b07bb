"""`run` of `python -m evaluation.linear_probe`, whose docstring states the protocol."""

from __future__ import annotations

import time
from dataclasses import asdict

from data import labelled
from evaluation import probe, report
from evaluation.classifiers import KnnHead, MLPHead
from evaluation.linear_probe import ProbeConfig
from models import TRANSFER_ENDPOINT
from models.runs import load_run_model
from runtime.cli import UsageError
from runtime.ownership import claim_run, fingerprint_of, start_run
from serving.client import SavedModelClient, ServingError


def load_model(cfg: ProbeConfig):
    """(model, model name, a description of the weights) from the config."""
    if cfg.saved_model:
        try:
            client = SavedModelClient(cfg.saved_model)
        except ServingError as error:
            raise UsageError(f"--saved_model={cfg.saved_model}: {error}") from None
        return client, None, cfg.saved_model
    try:
        loaded = load_run_model(cfg.model_dir, cfg.model, cfg.overrides(), init=cfg.init)
    except (FileNotFoundError, ValueError) as error:
        flag = "--model_dir" if cfg.model_dir else "--model_kwargs"
        raise UsageError(f"{flag}={cfg.model_dir or cfg.model_kwargs}: {error}") from None
    weights = ("random init" if cfg.init == "random"
               else f"{loaded.checkpoint} ({loaded.loaded} tensors)")
    return loaded.model, loaded.name, weights


def run(cfg: ProbeConfig):
    """Run the probe of `cfg`; write config.json, probe.json and probe.md; print and return
    (result, console table)."""
    with claim_run(cfg.out, fingerprint_of(cfg, cfg.RESUMABLE), "--output_dir") as claim:
        result, seconds, name, weights = _probe(cfg)
        start_run(claim, asdict(cfg))  # complete results: config.json, then them
    labels = cfg.labels_per_class or "all"
    headers = ["endpoint", "pooled", "dims", "head", "labels/class", "splits", "val acc %",
               "test acc %"]
    rows = []
    for e in result.endpoints:
        val = [s.val_accuracy for s in e.splits if s.val_accuracy is not None]
        rows.append([e.endpoint, "x".join(map(str, e.shape)), str(e.dims), cfg.head,
                     str(labels), str(cfg.splits),
                     report.percent(*report.mean_std(val)) if val else "-",
                     report.percent(e.mean, e.std)])
    title = (f"{cfg.head} probe of {name} ({weights}) on {cfg.dataset}: "
             f"{result.train_examples} train images drawn, {result.test_examples} test images")
    payload = {"config": asdict(cfg), "model": name, "weights": weights,
               "seconds": seconds, **result.to_json()}
    table = report.write_report(cfg.out, "probe", payload, headers, rows, title)
    text = f"{title}\n{table}"
    print(text)
    print(f"wrote {cfg.out}/probe.md and probe.json")
    return result, text


def _probe(cfg: ProbeConfig):
    """(the ProbeResult, seconds, model name, a description of the weights)."""
    model, name, weights = load_model(cfg)
    endpoints = cfg.endpoints
    if endpoints is None:
        if name not in TRANSFER_ENDPOINT:
            raise UsageError("--endpoints is required for this model")
        endpoints = (TRANSFER_ENDPOINT[name],)
    try:
        probe.check_endpoints(model, endpoints)
    except ValueError as error:
        raise UsageError(f"--endpoints: {error}") from None
    source = labelled.LabelledSource(cfg.dataset, cfg.data_dir, cfg.manual_dir, cfg.stl10_dir)
    tic = time.time()
    try:
        result = probe.run_probe(
            model, endpoints, source, cfg.labels_per_class, cfg.splits, seed=cfg.seed,
            stl10_folds=cfg.stl10_folds, max_test_examples=cfg.max_test_examples or None,
            head=cfg.head, pool=cfg.pool, pool_size=cfg.pool_size or None,
            max_dims=cfg.max_dims, val_fraction=cfg.val_fraction, batch_size=cfg.batch_size,
            mlp=MLPHead(width=cfg.mlp_width, epochs=cfg.mlp_epochs,
                        learning_rate=cfg.mlp_learning_rate),
            knn=KnnHead(k=cfg.knn_k))
    except labelled.LabelsPerClassError as error:
        raise UsageError(f"--labels_per_class={cfg.labels_per_class}: {error}") from None
    return result, time.time() - tic, name or model.name, weights
