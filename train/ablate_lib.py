"""`run` of `python -m train.ablate`, whose docstring states the protocol."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
from absl import flags

from evaluation import finetune, finetune_lib
from evaluation.compare import compare
from evaluation.figures import plot_ablation
from evaluation.report import format_table, paired_gap, write_json
from models.runs import load_run_model
from runtime import cli
from runtime.files import read_json, write_text_atomic
from train.ablate import PROGRAM, VARIANTS, AblateConfig
from train.config import TrainConfig
from train.pretrain_lib import random_twin
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
    fv = flags.FlagValues()
    cli.define_flags(TrainConfig, fv, PROGRAM)
    fv([PROGRAM, f"--flagfile={flagfile}"])
    config = dataclasses.replace(cli.config_from_flags(TrainConfig, fv), **common)
    return dataclasses.replace(config, epochs=cfg.sc_epochs) if cfg.sc_epochs else config


def evaluate_run(cfg: AblateConfig, config) -> dict:
    """{view: {"pretrained": mean accuracy, "random init": ..., "pixels": ...}} of one run,
    cached in the run folder (`ablation.json`)."""
    path = os.path.join(config.model_dir, "ablation.json")
    cached = read_json(path)
    if cached is not None:
        return cached
    model = load_run_model(config.model_dir).model
    views = {"linear": "sc"} | ({"knn": "embedding"} if config.method == "nat" else {})
    comparison = compare(model, random_twin(config), "digits", views, cfg.labels_per_class,
                         cfg.splits, config.seed, config.method)
    out = {view: {r.init: r.mean for r in comparison.rows if r.view == view}
           for view in views}
    if config.method == "sc":
        out["finetune"] = _finetune(cfg, config)
    write_json(path, out)
    return out


def _finetune(cfg: AblateConfig, config) -> dict:
    """Fine-tuned test accuracy of the run's network and of the same network from scratch,
    with the same seed (label draw, classifier init, batches); the scratch run of a seed is
    shared by every SC variant."""
    def accuracy(init: str, out: str) -> float:
        ft = finetune.FinetuneConfig(init=init, model=config.model, dataset="digits",
                                     labels_per_class=cfg.labels_per_class,
                                     seeds=(config.seed,), output_dir=out)
        results, _ = finetune_lib.run(ft)
        return next(iter(results.values()))[0].test_accuracy

    scratch_dir = os.path.join(cfg.output_dir, "scratch", f"seed{config.seed}")
    scratch = read_json(os.path.join(scratch_dir, "accuracy.json"))
    if scratch is None:
        scratch = {"accuracy": accuracy("none", scratch_dir)}
        write_json(os.path.join(scratch_dir, "accuracy.json"), scratch)
    return {"pretrained": accuracy(config.model_dir, os.path.join(config.model_dir, "finetune")),
            "random init": scratch["accuracy"]}


def summarise(per_seed: dict[str, list[dict]]) -> list[dict]:
    """One row per (variant, view): mean ± sd over the seeds, and the paired gap."""
    rows = []
    for variant, runs in per_seed.items():
        for view in runs[0]:
            trained = [r[view]["pretrained"] for r in runs]
            random = [r[view]["random init"] for r in runs]
            gap = paired_gap(trained, random, "pretraining seeds")
            rows.append({"variant": variant, "view": view, "seeds": len(runs),
                         "pretrained": [float(np.mean(trained)), float(np.std(trained))],
                         "random init": [float(np.mean(random)), float(np.std(random))],
                         "pixels": runs[0][view].get("pixels"),
                         "gap": {**gap.__dict__, "text": gap.describe()}})
    return rows


VIEW_NAMES = {"linear": "linear probe on sc", "knn": "1-NN on embedding",
              "finetune": "fine-tuned (vs scratch)"}


def _verdict(gap: dict) -> str:
    if gap["p"] != gap["p"]:  # NaN: too few seeds for a test
        return "too few seeds"
    return "gap > spread" if gap["p"] < 0.05 else "no difference"


def table(rows: list[dict]) -> str:
    headers = ["variant", "view", "pretrained %", "twin %", "gap (points)", "p", "verdict"]
    body = [[r["variant"], VIEW_NAMES[r["view"]],
             f"{100 * r['pretrained'][0]:.1f} ± {100 * r['pretrained'][1]:.1f}",
             f"{100 * r['random init'][0]:.1f} ± {100 * r['random init'][1]:.1f}",
             f"{100 * r['gap']['mean']:+.1f} ± {100 * r['gap']['sd']:.1f}",
             "-" if r["gap"]["p"] != r["gap"]["p"] else f"{r['gap']['p']:.3f}",
             _verdict(r["gap"])] for r in rows]
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
          f"random-init twin (fine-tuning: against scratch), {cfg.labels_per_class} labels "
          f"per class; {seconds:.0f} s. Wrote {cfg.output_dir}/ablation.md, ablation.json, "
          "ablation.png")
    return rows
