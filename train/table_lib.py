"""`run` of `python -m train.table`, whose docstring states the protocol."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable

import keras
import numpy as np

from evaluation import finetune, finetune_lib
from evaluation.classifiers import KnnHead
from evaluation.features import PIXELS
from evaluation.figures import plot_table
from evaluation.probe import extract_probe_features, run_probe
from evaluation.random_init import AT_INIT, CALIBRATED
from evaluation.report import write_json
from evaluation.seed_table import finetune_row, frozen_row, table_text
from models import TRANSFER_ENDPOINT
from models.checkpoints import resolve_checkpoint
from models.runs import load_run_model
from runtime.files import write_text_atomic
from train.cached import cached, checkpoint_identity
from train.config import TrainConfig, from_flagfile
from train.pretrain_lib import calibrated_twin, probe_source, random_twin
from train.pretrain_lib import run as pretrain
from train.table import PROGRAM, TableConfig, recipe_path


def train_config(cfg: TableConfig, method: str, seed: int) -> TrainConfig:
    """The recipe's TrainConfig of one run, in its folder, without export, periodic probe or
    final table (the table measures it)."""
    changes = dict(model_dir=os.path.join(cfg.output_dir, method, f"seed{seed}"), seed=seed,
                   export_dir="none", final_eval="none", probe_every_epochs=0,
                   data_dir=cfg.data_dir, manual_dir=cfg.manual_dir)
    if cfg.epochs:
        changes["epochs"] = cfg.epochs
    return from_flagfile(recipe_path(method, cfg.dataset), PROGRAM, **changes)


def views(cfg: TableConfig, model_name: str, has_embedding: bool) -> dict[str, dict]:
    """{view: its probe settings}: the frozen views of the module docstring."""
    transfer = TRANSFER_ENDPOINT[model_name]
    near = ({"endpoint": "embedding", "pool_size": None} if has_embedding
            else {"endpoint": transfer, "pool_size": 1})  # SC: the global average of `sc`
    out = {"linear, all labels": {"endpoint": transfer, "pool_size": None, "head": "linear",
                                  "labels": 0, "splits": 1},
           f"{cfg.knn_k}-NN, all labels": {**near, "head": "knn", "labels": 0, "splits": 1,
                                            "k": cfg.knn_k, "temperature": cfg.knn_temperature},
           "1-NN, all labels": {**near, "head": "knn", "labels": 0, "splits": 1, "k": 1,
                                "temperature": None}}
    for k in cfg.few_labels:
        out[f"linear, {k}/class"] = {"endpoint": transfer, "pool_size": None, "head": "linear",
                                     "labels": k, "splits": cfg.few_splits}
    return out


class _Network:
    """One network's probes: the model is made when first needed (a calibration costs a pass
    over the pretraining images) and its features are extracted once per (endpoint, pooling)."""

    def __init__(self, cfg: TableConfig, make: Callable[[], object], source, seed: int,
                 name: str):
        self.cfg, self.make, self.source, self.seed, self.name = cfg, make, source, seed, name
        self.model, self.extracted = None, {}

    def accuracies(self, view: str, s: dict) -> list[float]:
        """Test (or holdout) accuracy per label draw of `view`, with settings `s`; says so."""
        cfg, tic = self.cfg, time.time()
        if self.model is None:
            self.model = self.make()
        where = (s["endpoint"], s["pool_size"])
        if where not in self.extracted:
            self.extracted[where] = extract_probe_features(
                self.model, [s["endpoint"]], self.source, seed=self.seed,
                evaluate_on=cfg.eval_split, holdout_per_class=cfg.holdout_per_class,
                pool_size=s["pool_size"])
        knn = KnnHead(s.get("k", 1), s.get("temperature") or None)
        result = run_probe(self.model, [s["endpoint"]], self.source, s["labels"], s["splits"],
                           seed=self.seed, head=s["head"], knn=knn, pool_size=s["pool_size"],
                           evaluate_on=cfg.eval_split, holdout_per_class=cfg.holdout_per_class,
                           features=self.extracted[where])
        accuracies = [float(a) for a in result.endpoints[0].accuracies]
        print(f"{self.name}, {view} on {s['endpoint']}: {100 * np.mean(accuracies):.1f}% "
              f"({time.time() - tic:.0f} s)", flush=True)
        return accuracies


def weights_digest(model, endpoints) -> str:
    """sha256 of every weight (BN statistics included) that the `endpoints` depend on."""
    sub = keras.Model(model.inputs, [model.output[e] for e in endpoints])
    digest = hashlib.sha256()
    for w in sub.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    return digest.hexdigest()


def _key(cfg: TableConfig, settings: dict, seed: int) -> dict:
    return {"dataset": cfg.dataset, "eval_split": cfg.eval_split,
            "holdout_per_class": cfg.holdout_per_class if cfg.eval_split == "validation" else
            None, "view": settings, "seed": seed}


def _name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def frozen_figures(cfg: TableConfig, config: TrainConfig) -> dict[str, dict[str, list]]:
    """{view: {"pretrained", AT_INIT, CALIBRATED, "pixels": accuracies per draw}} of one run.
    The pretrained rows are cached in the run folder for its checkpoint; the twins' and the
    pixels' per view in <output_dir>/shared/, keyed by the digest of the weights the view
    reads (so methods whose backbones start from the same weights share them)."""
    prefix = resolve_checkpoint(config.model_dir)  # one checkpoint for every row
    model = load_run_model(config.model_dir, checkpoint=prefix).model
    settings = views(cfg, config.model, "embedding" in model.output)
    source = probe_source(config, cfg.dataset)
    seed = config.seed
    mine = _Network(cfg, lambda: model, source, seed, f"{config.method} seed {seed}")
    pretrained = cached(os.path.join(config.model_dir, "table.json"),
                        {**_key(cfg, settings, seed), "checkpoint": checkpoint_identity(prefix)},
                        lambda: {v: mine.accuracies(v, s) for v, s in settings.items()})
    mine.extracted = {}  # its features are not needed again
    twin = random_twin(config)
    networks = {AT_INIT: _Network(cfg, lambda: twin, source, seed, f"{AT_INIT}, seed {seed}"),
                CALIBRATED: _Network(cfg, lambda: calibrated_twin(config), source, seed,
                                     f"{CALIBRATED}, seed {seed}"),
                "pixels": _Network(cfg, lambda: model, source, seed, f"pixels, seed {seed}")}
    shared = os.path.join(cfg.output_dir, "shared")
    digests = {e: weights_digest(twin, [e]) for e in {s["endpoint"] for s in settings.values()}}
    out = {view: {"pretrained": pretrained[view]} for view in settings}
    # One network at a time, every view, then its features go: at most one network's
    # features in memory (60000 x 3136 floats each on Fashion-MNIST).
    for row, network in networks.items():
        for view, s in settings.items():
            if row == "pixels":
                asked = {**s, "endpoint": PIXELS, "pool_size": None}
                key = _key(cfg, asked, seed)
            else:
                asked = s
                key = {**_key(cfg, s, seed), "init": row,
                       "weights": digests[s["endpoint"]],
                       "calibrated_on": config.dataset if row == CALIBRATED else None}
            out[view][row] = cached(os.path.join(shared, f"{_name(key)}.json"), key,
                                    lambda n=network, a=asked, v=view: n.accuracies(v, a))
        network.model, network.extracted = None, {}
    return out


def _finetune_config(cfg: TableConfig, config: TrainConfig, labels: int, pretrained: str,
                     out: str) -> finetune.FinetuneConfig:
    """Fine-tuning with `labels` per class (0: all) from `pretrained` ("" : scratch). With
    every label, batches of the pretraining's size and at most --finetune_epochs epochs."""
    every = dict(batch_size=config.batch_size, epochs=cfg.finetune_epochs, patience=2,
                 max_cuts=2) if labels == 0 else {}
    return finetune.FinetuneConfig(
        pretrained=pretrained, init="pretrained" if pretrained else "random",
        model=config.model, dataset=cfg.dataset, data_dir=cfg.data_dir,
        manual_dir=cfg.manual_dir, labels_per_class=labels, seeds=(config.seed,),
        output_dir=out, eval_split=cfg.eval_split, holdout_per_class=cfg.holdout_per_class,
        **every)


def _finetuned(ft: finetune.FinetuneConfig) -> float:
    results, _ = finetune_lib.run(ft)
    return next(iter(results.values()))[0].test_accuracy


def finetune_figures(cfg: TableConfig, config: TrainConfig) -> dict[str, dict[str, float]]:
    """{labels: {"pretrained", "scratch": accuracy}} of one run; the scratch run of a seed
    is shared by every method with the same model (<output_dir>/scratch/<model>/seed<k>)."""
    prefix = resolve_checkpoint(config.model_dir)
    out = {}
    for labels in cfg.finetune_labels:
        name = f"labels{labels}" if labels else "all_labels"
        mine = _finetune_config(cfg, config, labels, prefix,
                                os.path.join(config.model_dir, f"finetune_{name}"))
        key = {k: v for k, v in dataclasses.asdict(mine).items()
               if k not in ("output_dir", "pretrained", "init")}
        scratch_dir = os.path.join(cfg.output_dir, "scratch", config.model, f"seed{config.seed}",
                                   name)
        scratch = _finetune_config(cfg, config, labels, "", scratch_dir)
        out[name] = {
            "pretrained": cached(os.path.join(config.model_dir, f"finetune_{name}.json"),
                                 {**key, "checkpoint": checkpoint_identity(prefix)},
                                 lambda ft=mine: _finetuned(ft)),
            "scratch": cached(os.path.join(scratch_dir, "accuracy.json"), key,
                              lambda ft=scratch: _finetuned(ft))}
    return out


def run(cfg: TableConfig) -> list[dict]:
    """Pretrain (or resume) every run, measure it, write and print the table."""
    tic = time.time()
    per_seed: dict[str, list[dict]] = {}
    for method in cfg.methods:
        for seed in cfg.seeds:
            config = train_config(cfg, method, seed)
            print(f"--- {method}, seed {seed}: {config.model_dir}")
            pretrain(config)
            per_seed.setdefault(method, []).append(
                {"frozen": frozen_figures(cfg, config),
                 "finetune": finetune_figures(cfg, config)})
    rows = [frozen_row(method, view, [s["frozen"][view] for s in runs])
            for method, runs in per_seed.items() for view in runs[0]["frozen"]]
    rows += [finetune_row(method, labels, [s["finetune"][labels] for s in runs])
             for method, runs in per_seed.items() for labels in runs[0]["finetune"]]
    seconds = time.time() - tic
    text = table_text(cfg.dataset, cfg.eval_split, rows, len(cfg.seeds), cfg.finetune_epochs)
    write_json(os.path.join(cfg.output_dir, "table.json"),
               {"config": dataclasses.asdict(cfg), "rows": rows, "per_seed": per_seed,
                "seconds": seconds})
    write_text_atomic(os.path.join(cfg.output_dir, "table.md"), text + "\n")
    plot_table(rows, cfg.dataset, cfg.eval_split, os.path.join(cfg.output_dir, "table.png"),
               cfg.finetune_epochs)
    print(f"\n{text}\n\n{seconds:.0f} s. Wrote {cfg.output_dir}/table.md, table.json, "
          "table.png")
    return rows
