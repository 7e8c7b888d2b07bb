r"""The papers' ablations at small scale, on the embedded digits, each run against its twin.

    python -m train.ablate                                  # every variant, seeds 0, 1, 2
    python -m train.ablate --variants=nat,fixed_p --seeds=0,1,2,3,4 --epochs=60

Variants (nin_mnist; the main job's recipe unless stated):
    nat               NAT, targets re-assigned every 3 epochs (the method)
    every_epoch       re-assigned every epoch (NAT Figure 2, right: too often hurts)
    fixed_p           never re-assigned: the "fixed P" baseline (NAT Sec. 4.1, 26.4% vs 36.0%)
    onehot            one-hot (discrete) targets instead of the sphere (NAT Sec. 4.1, 22%)
    translations      NAT with 2-pixel translations instead of resized crops
    sc                Spatial Contrasting (train/configs/sc_digits.flags)
    sc_flatten        SC with flattened windows instead of averaged ones

Protocol. Every variant pretrains once per seed in its own run folder
(`<output_dir>/<variant>/seed<k>`, a run of `train.pretrain`: a rerun resumes or skips it).
Each pretrained network is then compared with ITS random-init twin (the same seeded
initialisation) on the same label draws (`evaluation.compare`): a linear probe on `sc` and
1-NN (cosine) on the embedding, 10 labels per class, 5 draws. SC has no embedding, so its
second view is fine-tuning (`evaluation.finetune`, the SC protocol) of the SC init against
scratch, with the label draw and every other seed shared. Per seed, the gap is the mean over
the draws of the paired differences; the table reports mean ± sd over the seeds and a paired
t-test over the seeds. A gap inside its spread is reported as no difference.

Writes `<output_dir>/ablation.json` (every figure), `ablation.md` and `ablation.png`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from runtime import cli
from runtime.cli import UsageError, option

PROGRAM = "train.ablate"
SC_FLAGFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                           "sc_digits.flags")
# variant -> (flagfile or None for the main job's defaults, settings changed)
VARIANTS = {
    "nat": (None, {}),
    "every_epoch": (None, {"nat_reassign_every": 1}),
    "fixed_p": (None, {"nat_reassign_every": 0}),
    "onehot": (None, {"nat_targets": "onehot"}),
    "translations": (None, {"crop": "pad", "crop_pad": 2}),
    "sc": (SC_FLAGFILE, {}),
    "sc_flatten": (SC_FLAGFILE, {"sc_pool": "flatten"}),
}


@dataclass(frozen=True)
class AblateConfig:
    """The flags of `python -m train.ablate`."""

    variants: tuple[str, ...] = option(tuple(VARIANTS), "Variants to run (module docstring).")
    seeds: tuple[int, ...] = option((0, 1, 2), "Pretraining seeds; each run has its own twin.")
    epochs: int = option(60, "NAT pretraining epochs.", lower=1)
    sc_epochs: int = option(0, "SC pretraining epochs (0: the flagfile's).", lower=0)
    labels_per_class: int = option(10, "Labels per class of the probes and fine-tuning.",
                                   lower=1)
    splits: int = option(5, "Label draws of the probes.", lower=2)
    output_dir: str = option(os.path.join("runs", "ablate"), "Where the runs and the tables go.")

    def __post_init__(self):
        for name in self.variants:
            cli.check_choice("variants", name, tuple(VARIANTS))
        if not self.variants or not self.seeds:
            raise UsageError("--variants and --seeds need at least one value")


def train_config(cfg: AblateConfig, variant: str, seed: int):
    """The TrainConfig of one run (no export, no periodic probe, no final table)."""
    from absl import flags

    from train.config import TrainConfig

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
    from evaluation.report import write_json
    from runtime.files import read_json

    path = os.path.join(config.model_dir, "ablation.json")
    cached = read_json(path)
    if cached is not None:
        return cached
    from evaluation.compare import compare
    from models.runs import load_run_model
    from train.pretrain import probe_source, random_twin

    model = load_run_model(config.model_dir).model
    views = {"linear": "sc"} | ({"knn": "embedding"} if config.method == "nat" else {})
    comparison = compare(model, random_twin(config), probe_source(config, "digits"), views,
                         cfg.labels_per_class, cfg.splits, config.seed, config.method)
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
    from evaluation import finetune
    from evaluation.report import write_json
    from runtime.files import read_json

    def accuracy(init: str, out: str) -> float:
        ft = finetune.FinetuneConfig(init=init, model=config.model, dataset="digits",
                                     data_dir=config.data_dir, manual_dir=config.manual_dir,
                                     labels_per_class=cfg.labels_per_class,
                                     seeds=(config.seed,), output_dir=out)
        results, _ = finetune.run(ft)
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
    import numpy as np

    from evaluation.report import paired_gap

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
    from evaluation.report import format_table

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
    import time

    from evaluation.report import write_json
    from runtime.files import write_text_atomic
    from train.pretrain import run as pretrain

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
    from evaluation.figures import plot_ablation

    plot_ablation(rows, os.path.join(cfg.output_dir, "ablation.png"))
    print(f"\n{text}\n\nmean ± sd over {len(cfg.seeds)} pretraining seeds, each against its "
          f"random-init twin (fine-tuning: against scratch), {cfg.labels_per_class} labels "
          f"per class; {seconds:.0f} s. Wrote {cfg.output_dir}/ablation.md, ablation.json, "
          "ablation.png")
    return rows


def main(argv=None) -> None:
    cli.main(PROGRAM, AblateConfig, run, module_name=PROGRAM, doc=__doc__, argv=argv)


if __name__ == "__main__":
    main()
