"""`run` of `python -m train.ablate`, whose docstring states the protocol."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from evaluation import finetune, finetune_lib
from evaluation.compare import compare
from evaluation.figures import plot_ablation
from evaluation.random_init import stronger
from evaluation.report import format_table, paired_gap, write_json
from evaluation.seed_table import verdict
from models.checkpoints import resolve_checkpoint
from models.runs import load_run_model
from runtime.files import write_text_atomic
from train.ablate import PROGRAM, VARIANTS, AblateConfig
from train.cached import cached, checkpoint_identity
from train.config import TrainConfig, from_flagfile
from train.pretrain_lib import calibrated_twin, probe_source, random_twin
from train.pretrain_lib import run as pretrain


def train_config(cfg: AblateConfig, variant: str, seed: int):
    """The TrainConfig of one run (no export, no periodic probe, no final table)."""
    flagfile, changes = VARIANTS[variant]
    common = dict(model_dir=os.path.join(cfg.output_dir, variant, f"seed{seed}"), seed=seed,
                  export_dir="none", final_eval="none", probe_every_epochs=0,
                  probe_labels_per_class=cfg.labels_per_class, probe_splits=cfg.splits,
                  **changes)
    if flagfile is None:
        return TrainConfig(epochs=cfg.epochs, **common)
    config = from_flagfile(flagfile, PROGRAM, **common)
    return dataclasses.replace(config, epochs=cfg.sc_epochs) if cfg.sc_epochs else config


def evaluate_run(cfg: AblateConfig, config) -> dict:
    """{view: {"pretrained": mean accuracy, <each random-init row>: ..., "pixels": ...}} of
    one run, cached in the run folder (`ablation.json`) for the settings and the checkpoint
    it answers (train/cached.py)."""

    views = {"linear": "sc"} | ({"knn": "embedding"} if config.method == "nat" else {})
    prefix = resolve_checkpoint(config.model_dir)  # one checkpoint for every view and row
    key = {"dataset": "digits", "views": views, "labels_per_class": cfg.labels_per_class,
           "splits": cfg.splits, "seed": config.seed, "method": config.method,
           "model": config.model, "model_kwargs": config.model_kwargs(),
           "checkpoint": checkpoint_identity(prefix),
           "finetune": _finetune_key(cfg, config) if config.method == "sc" else None}
    return cached(os.path.join(config.model_dir, "ablation.json"), key,
                  lambda: _evaluate(cfg, config, views, prefix))


def _evaluate(cfg: AblateConfig, config, views: dict, prefix: str) -> dict:

    model = load_run_model(config.model_dir, checkpoint=prefix).model
    comparison = compare(model, random_twin(config), probe_source(config, "digits"), views,
                         cfg.labels_per_class, cfg.splits, config.seed, config.method,
                         calibrated=calibrated_twin(config))
    out = {view: {r.init: r.mean for r in comparison.rows if r.view == view}
           for view in views}
    if config.method == "sc":
        out["finetune"] = _finetune(cfg, config, prefix)
    return out


def _finetune_config(cfg: AblateConfig, config, pretrained: str, out: str):
    """The fine-tuning of `pretrained` (a run folder; "": from scratch) into `out`."""
    return finetune.FinetuneConfig(pretrained=pretrained,
                                   init="pretrained" if pretrained else "random",
                                   model=config.model, dataset="digits",
                                   data_dir=config.data_dir, manual_dir=config.manual_dir,
                                   labels_per_class=cfg.labels_per_class,
                                   seeds=(config.seed,), output_dir=out)


def _finetune_key(cfg: AblateConfig, config) -> dict:
    """Every fine-tuning setting but where it writes (the init is keyed by the checkpoint)."""
    settings = dataclasses.asdict(_finetune_config(cfg, config, "", ""))
    return {k: v for k, v in settings.items() if k not in ("output_dir", "init", "pretrained")}


def _finetune(cfg: AblateConfig, config, prefix: str) -> dict:
    """Fine-tuned test accuracy of the run's network and of the same network from scratch,
    with the same seed (label draw, classifier init, batches); the scratch run of a seed is
    shared by every SC variant (cached for its settings in scratch/seed<k>/accuracy.json)."""

    def accuracy(pretrained: str, out: str) -> float:
        results, _ = finetune_lib.run(_finetune_config(cfg, config, pretrained, out))
        return next(iter(results.values()))[0].test_accuracy

    # The fine-tuning folders are named by the labels, so that other settings get new ones.
    labels = f"labels{cfg.labels_per_class}"
    scratch_dir = os.path.join(cfg.output_dir, "scratch", f"seed{config.seed}")
    scratch = cached(os.path.join(scratch_dir, "accuracy.json"),
                     {"init": "random", **_finetune_key(cfg, config)},
                     lambda: {"accuracy": accuracy("", os.path.join(scratch_dir, labels))})
    return {"pretrained": accuracy(prefix,
                                   os.path.join(config.model_dir, f"finetune_{labels}")),
            "random init": scratch["accuracy"]}


def summarise(per_seed: dict[str, list[dict]]) -> list[dict]:
    """One row per (variant, view): mean ± sd over the seeds, and the paired gap against the
    stronger random-init row over the same seeds ("against" says which; every random-init
    row is kept under "random inits")."""


    rows = []
    for variant, runs in per_seed.items():
        for view in runs[0]:
            trained = [r[view]["pretrained"] for r in runs]
            randoms = {name: [r[view][name] for r in runs] for name in runs[0][view]
                       if name.startswith("random init")}
            against = stronger(randoms)
            gap = paired_gap(trained, randoms[against], "pretraining seeds")
            rows.append({"variant": variant, "view": view, "seeds": len(runs),
                         "pretrained": [float(np.mean(trained)), float(np.std(trained))],
                         "random init": [float(np.mean(randoms[against])),
                                         float(np.std(randoms[against]))],
                         "against": against,
                         "random inits": {name: [float(np.mean(v)), float(np.std(v))]
                                          for name, v in randoms.items()},
                         "pixels": runs[0][view].get("pixels"),
                         "gap": {**gap.__dict__, "text": gap.describe()}})
    return rows


VIEW_NAMES = {"linear": "linear probe on sc", "knn": "1-NN on embedding",
              "finetune": "fine-tuned (vs scratch)"}


def _twin_name(row: dict) -> str:
    """Which random-init row the gap was taken against (the stronger; scratch: fine-tuning)."""
    if row["view"] == "finetune":
        return "scratch"
    names = {"random init, BN at init": "BN at init", "random init, BN calibrated":
             "BN calibrated"}
    others = len(row.get("random inits", {})) - 1
    return names.get(row.get("against"), "random init") + (" (stronger)" if others > 0 else "")


def table(rows: list[dict]) -> str:

    headers = ["variant", "view", "pretrained %", "twin %", "twin", "gap (points)", "p",
               "verdict"]
    body = [[r["variant"], VIEW_NAMES[r["view"]],
             f"{100 * r['pretrained'][0]:.1f} ± {100 * r['pretrained'][1]:.1f}",
             f"{100 * r['random init'][0]:.1f} ± {100 * r['random init'][1]:.1f}",
             _twin_name(r),
             f"{100 * r['gap']['mean']:+.1f} ± {100 * r['gap']['sd']:.1f}",
             "-" if r["gap"]["p"] != r["gap"]["p"] else f"{r['gap']['p']:.3f}",
             verdict(r["gap"])] for r in rows]
    return format_table(headers, body)


def run(cfg: AblateConfig) -> list[dict]:
    """Pretrain (or resume) every run, evaluate it against its twin, write and print the
    tables."""
    tic = time.time()
    per_seed: dict[str, list[dict]] = {}
    for variant in cfg.variants:
        for seed in cfg.seeds:
            config = train_config(cfg, variant, seed)
            print(f"--- {variant}, seed {seed}: {config.model_dir}")
            pretrain(config)
            per_seed.setdefault(variant, []).append(evaluate_run(cfg, config))
    rows = summarise(per_seed)
    text = table(rows)
    seconds = time.time() - tic
    write_json(os.path.join(cfg.output_dir, "ablation.json"),
               {"config": dataclasses.asdict(cfg), "rows": rows, "per_seed": per_seed,
                "seconds": seconds})
    write_text_atomic(os.path.join(cfg.output_dir, "ablation.md"), text + "\n")
    plot_ablation(rows, os.path.join(cfg.output_dir, "ablation.png"))
    print(f"\n{text}\n\nmean ± sd over {len(cfg.seeds)} pretraining seeds, each against its "
          "random-init twin (the stronger of BN at init and BN calibrated on the train digits; "
          f"fine-tuning: against scratch), {cfg.labels_per_class} labels per class; "
          f"{seconds:.0f} s. Wrote {cfg.output_dir}/ablation.md, ablation.json, ablation.png")
    return rows
